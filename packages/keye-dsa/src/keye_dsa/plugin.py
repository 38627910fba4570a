"""keye-dsa's ``keye`` entry point: registers the ``dsa`` attention backend with keye-moe.

keye-dsa never imports keye-moe; pluggy matches the hook by name. Torch-heavy modules are imported
inside the hook so that listing plugins stays cheap.
"""

from __future__ import annotations

import pluggy

hookimpl = pluggy.HookimplMarker("keye")


@hookimpl
def keye_attention_backends():
    """``{"dsa": factory}``; ``factory(decoder_config)`` returns a ``keye_dsa.backend.DSABackend``."""
    from keye_dsa.backend import DSABackend

    return {"dsa": DSABackend}
