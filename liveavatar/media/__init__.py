"""Media I/O: image loading and sizing, audio decoding, fragmented MP4 writing."""
