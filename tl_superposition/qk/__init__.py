"""QK transcoders (Wynroe & Sharkey 2024)."""
