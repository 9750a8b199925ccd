"""The fleetflow simulator (issue 7): virtual devices running the real agent code. Not built yet."""
