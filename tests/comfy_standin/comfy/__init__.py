"""Stand-in for the ComfyUI host modules the RLR nodes call at run time (contract tests only)."""
