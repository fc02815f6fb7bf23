"""fa-restic: an HTTP backup API over restic."""
