"""The fleetflow hub (issue 5): durable workflow state, placement, failure detection. Not built yet."""
