"""Filter library and recipe composition; subset (.npy) read/write."""
