"""The state store (one DuckDB file per connection): schema, connection, cursors."""
