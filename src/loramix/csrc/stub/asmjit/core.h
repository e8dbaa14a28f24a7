// FBGEMM's public headers include asmjit for its JIT's register types, which the fp16 product does not use and
// torch's wheel does not ship: these two stubs stand in for them (native.cpp uses no asmjit type).
#pragma once
#define ASMJIT_LIBRARY_MAKE_VERSION(major, minor, patch) (((major) << 16) | ((minor) << 8) | (patch))
#define ASMJIT_LIBRARY_VERSION 0
