"""Fleet deployments: a versioned workflow rolled out to the nodes a target selects, node by node, with rates,
waves, abort criteria, proven success and rollback (README.md in this folder).

Nothing is imported here: hub/workflow.py reads `versions` (the semver rules its `migrates_from` field is checked
by), and the core modules import hub/workflow.py in turn.
"""
