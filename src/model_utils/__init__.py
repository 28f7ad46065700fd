"""ModelArts / OBS integration and rank identity from the launcher environment."""
