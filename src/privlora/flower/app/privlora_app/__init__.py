"""privlora's Flower App components (the code is in the installed privlora.flower package)."""
