"""crashcart runtime: the verbs an operator runs after (or instead of) `cdktf deploy`.

Nothing in this package imports cdktf: every command must start in well under a second. The CDKTF
app (main.py and stacks/) imports `scripts.config`, never the other way round.
"""
