"""The one mark of a refused input: errors a user fixes by changing an argument, a config value, a file or a
service address (not bugs).

Each such error class of the project also derives from :class:`InputError` (``ConfigError``, ``CheckpointError``,
``MissingWeightsError``, ``TokenShardError``, ``UnreadableDataError``, ``TrackingError``), and its message is one
sentence naming the file or key and what to do. Jobs turn them into exit code 2 (:func:`ideal_ray.cli.outcome`);
anything else keeps its traceback and exits 1. Standard library only: every layer may import it.
"""


class InputError(Exception):
    """Refused input, config, file or service; the message is one sentence a user can act on."""
