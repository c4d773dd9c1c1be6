"""The rescue VM's bash upload path alone (_common.sh.j2 + _upload.sh.j2), driven on a local file: for the
upload benchmark and the tests of the upload path, which need it without the rest of collect.sh.

The script reads its values from the environment as Run Command hands parameters: BlobEndpoint, Container,
BlockSize, Parallel, ImdsEndpoint, Src, Length, Name; it prints `UPLOADED <sha256> <crc64> <crc64_by>`.
"""

from __future__ import annotations

from scripts import remote

_DRIVER = """
readonly XMS_VERSION={x_ms_version}
readonly PROGRESS_MARKER={progress_marker}
readonly STORAGE_RESOURCE='https://storage.azure.com/'
BLOB_ENDPOINT=$BlobEndpoint
CONTAINER=$Container
BLOCK_SIZE=$BlockSize
PARALLEL=$Parallel
MAX_ATTEMPTS={max_attempts}
AUTH_WAIT={auth_wait}
CLIENT_ID=''
IMDS=$ImdsEndpoint
result_fields() {{ RESULT_ARGS=(); }}
{upload}
TMP=$(mktemp -d)
get_token || exit 3
upload_range "$Src" "$Length" "$Name" > /dev/null || exit 12
printf 'UPLOADED %s %s %s\\n' "$UPLOAD_SHA256" "$UPLOAD_CRC64" "${{UPLOAD_CRC64_BY:--}}"
"""


def upload_script(*, max_attempts: int = 8, auth_wait: int = 60) -> str:
    """The bash text: the shared partial, the upload partial and the driver lines above."""
    return "#!/bin/bash\n" + remote.render_template("_common.sh.j2") + _DRIVER.format(
        x_ms_version=remote.sh_literal(remote.X_MS_VERSION), progress_marker=remote.sh_literal(remote.PROGRESS_MARKER),
        max_attempts=int(max_attempts), auth_wait=int(auth_wait), upload=remote.render_template("_upload.sh.j2"))
