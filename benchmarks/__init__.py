"""Speed, memory and result measurements (not part of the test suite)."""
