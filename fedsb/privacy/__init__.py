"""Client-side differential privacy (Opacus DP-SGD, the private init gradient) and its accounting."""
