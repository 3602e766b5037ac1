"""The launcher: CLI, config, offers, selection, planning, task rendering and backends."""
