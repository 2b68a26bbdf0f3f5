"""Operating the sync without Dagster: status, held records, plan previews, rollback (used by the CLI)."""
