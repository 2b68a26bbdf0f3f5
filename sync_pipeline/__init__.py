"""sync-pipeline: an open, self-hosted Dynamics 365 <-> Marketo sync built on Dagster."""
