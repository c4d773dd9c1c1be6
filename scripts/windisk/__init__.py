"""A Windows disk read without mounting it, one on-disk structure per module: disk (VHD footer, MBR/GPT,
the Windows volume), ntfs (a file's extents), hive (CrashControl from the SYSTEM hive), and extract, which
puts them together into the findings the snapshot export acts on (inspect_disk -> DiskFindings)."""
