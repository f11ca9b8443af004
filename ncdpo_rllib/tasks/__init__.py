"""The task side: env factories and checks."""
