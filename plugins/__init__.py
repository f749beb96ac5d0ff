"""vlrm's first-party plugins, imported as ``vlrm_plugins`` and registered through the same
``vlrm`` entry-point group that third-party packages use (see pyproject.toml)."""
