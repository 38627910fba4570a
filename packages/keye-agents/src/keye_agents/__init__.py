"""keye-agents: an agent runtime for code, tool and search work (DESIGN §9)."""

__version__ = "0.1.0"
