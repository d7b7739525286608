"""Registry: register exports, promote by alias, rollback."""
