"""The kit's revisions, one file each, named by their ids in order (0001, 0002, ...).

A package so that an installed kit ships them; Alembic does not read this file.
"""
