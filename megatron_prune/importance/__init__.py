"""Importance scoring from calibration activations (Pangu Light Sec. 3.1, Minitron, Wanda-sp,
FLAP, ShortGPT, AlphaPruning's ESD), identical at every TP / SP / PP / DP layout."""
