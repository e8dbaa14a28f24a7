// See core.h: stand-ins for the asmjit register types FBGEMM's headers name.
#pragma once
namespace asmjit {
namespace x86 {
struct Xmm {};
struct Ymm {};
struct Zmm {};
}  // namespace x86
}  // namespace asmjit
