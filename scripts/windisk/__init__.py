"""A Windows disk read without mounting it, one on-disk structure per module: disk (VHD footer, MBR/GPT,
the Windows volume), ntfspath (a file found by path, a folder listed, with bounds dissect.ntfs lacks), ntfs
(a file's extents), hive (CrashControl from the SYSTEM hive), and extract, which puts them together into the
findings the snapshot export acts on (inspect_disk -> DiskFindings). Whatever the bytes, a reader here answers
or raises ExtractError (errors.py): damaged structures are named, never a traceback or a hang."""
