"""keye-dsa's ``keye`` entry point: registers the ``dsa`` attention backend with keye-moe.

keye-dsa never imports keye-moe; pluggy matches the hook by name.
"""

from __future__ import annotations

import pluggy

hookimpl = pluggy.HookimplMarker("keye")
