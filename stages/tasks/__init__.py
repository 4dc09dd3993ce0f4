"""doit's side: task dicts, actions, per-task processes, the reporter and commands. The only package importing doit."""
