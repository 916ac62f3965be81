"""Helpers behind run_mlm.py, by concern: data/, model/, train/, tools/, and the shared args, backend, errors, logs."""
