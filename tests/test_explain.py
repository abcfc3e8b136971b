"""Every errno the namespace calls can fail with becomes a message with a remedy."""

from __future__ import annotations

import errno
import os

import pytest

from nspool.launcher._explain import explain_private_proc, explain_unshare_error


@pytest.mark.parametrize(
    ("code", "user_ns", "needles"),
    [
        (errno.EPERM, True, ["user and PID namespace", "Fix:", "root"]),
        (errno.EPERM, False, ["PID namespace", "CAP_SYS_ADMIN", "--cap-add SYS_ADMIN"]),
        (errno.ENOSPC, True, ["namespace limit", "sysctl user.max_user_namespaces=15000"]),
        (errno.EINVAL, False, ["CONFIG_PID_NS", "threaded"]),
        (errno.ENOMEM, False, ["out of memory", "nesting limit"]),
        (errno.EUSERS, True, ["nesting limit"]),
    ],
)
def test_each_namespace_errno_gets_a_remedy(code: int, user_ns: bool, needles: list[str]) -> None:
    text = explain_unshare_error(OSError(code, os.strerror(code)), user_ns)
    assert text.startswith("nspool cannot create")
    assert os.strerror(code) in text
    for needle in needles:
        assert needle in text, text
    assert "python -m nspool doctor" in text


def test_private_proc_refusal_says_how_to_fix_it() -> None:
    text = explain_private_proc("mount(/proc): Operation not permitted")
    assert "Operation not permitted" in text and "private_proc" in text and "Fix:" in text
