"""Placements that run the engine on rows gathered from elsewhere: one module each.

Each module says in its docstring whether it is *exact* (equals one process at any world size) or
*local* (its result depends on how the rows are sharded).
"""
