"""Everything that knows restic's spelling: argv, JSON messages, exit codes, processes.

This package imports nothing of the API, the jobs or the store.
"""
