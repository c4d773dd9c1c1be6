"""Sources of the test images the stack-walk tests compile (tests/dumpfile/conftest.py `pe_builder`).

ntoskrnl.exe (a stand-in: the real one cannot be in the repository) has the bugcheck machinery's shapes:
KiPageFault enters by an exception (a machine frame with an error code), sets a frame pointer and calls
KeBugCheckEx; ExpFault is a plain function that calls through a pointer (the "fault" happens at that
call); ExpDispatch is a kernel routine that calls back into a driver. The drivers are C where the shape
is ordinary and assembly where a test needs a particular unwind code (frame pointer with a dynamic
allocation, chained unwind info, MOV-saved registers and XMM registers).
"""

NTOS_ASM = r"""
.text
.globl KeBugCheckEx
.seh_proc KeBugCheckEx
KeBugCheckEx:
    push %rbx
    .seh_pushreg %rbx
    sub $0x30, %rsp
    .seh_stackalloc 0x30
    .seh_endprologue
    call *%rax
    add $0x30, %rsp
    pop %rbx
    ret
.seh_endproc

.globl KiPageFault
.seh_proc KiPageFault
KiPageFault:
    .seh_pushframe @code
    push %rbp
    .seh_pushreg %rbp
    sub $0x158, %rsp
    .seh_stackalloc 0x158
    lea 0x80(%rsp), %rbp
    .seh_setframe %rbp, 0x80
    .seh_endprologue
    call KeBugCheckEx
    lea 0xd8(%rbp), %rsp
    pop %rbp
    add $8, %rsp
    iretq
.seh_endproc

.globl ExpFault
.seh_proc ExpFault
ExpFault:
    push %rbx
    .seh_pushreg %rbx
    push %rsi
    .seh_pushreg %rsi
    sub $0x48, %rsp
    .seh_stackalloc 0x48
    .seh_endprologue
    call *%rcx
    add $0x48, %rsp
    pop %rsi
    pop %rbx
    ret
.seh_endproc

.globl ExpDispatch
.seh_proc ExpDispatch
ExpDispatch:
    push %rdi
    .seh_pushreg %rdi
    sub $0x20, %rsp
    .seh_stackalloc 0x20
    .seh_endprologue
    call *%rdx
    add $0x20, %rsp
    pop %rdi
    ret
.seh_endproc

.globl NtEntry
NtEntry:
    ret
"""

DRIVER_C = r"""
typedef long (*callback)(void *);

__declspec(noinline) long DrvWork(callback next, void *context)
{
    volatile long scratch[6];
    scratch[2] = 3;
    return next(context) + scratch[2];
}

__declspec(noinline) long DrvOuter(callback next, void *context)
{
    return DrvWork(next, context) + 1;
}

long DriverEntry(void *driver, void *path)
{
    return DrvOuter((callback)driver, path);
}
"""

DRIVER_ASM = r"""
.text
# a frame-pointer function: after its prologue it moves RSP by an amount no unwind code records
.globl DrvFramePointer
.seh_proc DrvFramePointer
DrvFramePointer:
    push %rbp
    .seh_pushreg %rbp
    push %rdi
    .seh_pushreg %rdi
    sub $0x40, %rsp
    .seh_stackalloc 0x40
    lea 0x20(%rsp), %rbp
    .seh_setframe %rbp, 0x20
    .seh_endprologue
    sub $0x60, %rsp
    call *%rcx
    lea 0x20(%rbp), %rsp
    pop %rdi
    pop %rbp
    ret
.seh_endproc

# chained unwind info: the fragment saves RSI after the primary prologue
.globl DrvChained
.seh_proc DrvChained
DrvChained:
    push %rbx
    .seh_pushreg %rbx
    sub $0x30, %rsp
    .seh_stackalloc 0x30
    .seh_endprologue
    nop
    .seh_startchained
    push %rsi
    .seh_pushreg %rsi
    sub $0x10, %rsp
    .seh_stackalloc 0x10
    .seh_endprologue
    call *%rcx
    add $0x10, %rsp
    pop %rsi
    .seh_endchained
    add $0x30, %rsp
    pop %rbx
    ret
.seh_endproc

# registers saved with MOV (UWOP_SAVE_NONVOL, UWOP_SAVE_XMM128) instead of PUSH
.globl DrvSaves
.seh_proc DrvSaves
DrvSaves:
    sub $0x68, %rsp
    .seh_stackalloc 0x68
    mov %rbx, 0x50(%rsp)
    .seh_savereg %rbx, 0x50
    movaps %xmm6, 0x30(%rsp)
    .seh_savexmm %xmm6, 0x30
    .seh_endprologue
    call *%rcx
    movaps 0x30(%rsp), %xmm6
    mov 0x50(%rsp), %rbx
    add $0x68, %rsp
    ret
.seh_endproc
"""

# far variants: a frame too big for a dump's stack; the unwind unit test runs it on sparse memory
FAR_ASM = r"""
.text
.globl FarSaves
.seh_proc FarSaves
FarSaves:
    push %r12
    .seh_pushreg %r12
    sub $0x90000, %rsp
    .seh_stackalloc 0x90000
    mov %rbx, 0x88000(%rsp)
    .seh_savereg %rbx, 0x88000
    movaps %xmm7, 0x87000(%rsp)
    .seh_savexmm %xmm7, 0x87000
    .seh_endprologue
    call *%rcx
    ret
.seh_endproc

.globl FarCaller
.seh_proc FarCaller
FarCaller:
    sub $0x28, %rsp
    .seh_stackalloc 0x28
    .seh_endprologue
    call FarSaves
    add $0x28, %rsp
    ret
.seh_endproc

.globl FarEntry
FarEntry:
    ret
"""

DECOY_C = r"""
typedef long (*callback)(void *);

__declspec(noinline) long DecoyOld(callback next, void *context)
{
    return next(context) * 2;
}

long DriverEntry(void *driver, void *path)
{
    return DecoyOld((callback)driver, path);
}
"""
