"""The fleetflow simulator: virtual devices running the real agent code, fault injection, the checkers, the demo, and
deterministic simulation of the whole fleet (see README.md)."""
