// CUDA's built-in vector types (int4, uint4, float2, ..., dim3) and their make_* functions, laid
// out and aligned as in CUDA, for the host emulation.
#pragma once

#define FREEDIT_EMU_VECTOR1(T, name, align)                                                         \
  struct alignas(align) name##1 { T x; };                                                          \
  inline name##1 make_##name##1(T x) { return name##1{x}; }
#define FREEDIT_EMU_VECTOR2(T, name, align)                                                         \
  struct alignas(align) name##2 { T x, y; };                                                       \
  inline name##2 make_##name##2(T x, T y) { return name##2{x, y}; }
#define FREEDIT_EMU_VECTOR3(T, name)                                                                \
  struct name##3 { T x, y, z; };                                                                   \
  inline name##3 make_##name##3(T x, T y, T z) { return name##3{x, y, z}; }
#define FREEDIT_EMU_VECTOR4(T, name, align)                                                         \
  struct alignas(align) name##4 { T x, y, z, w; };                                                 \
  inline name##4 make_##name##4(T x, T y, T z, T w) { return name##4{x, y, z, w}; }
#define FREEDIT_EMU_VECTORS(T, name, a1, a2, a4)                                                    \
  FREEDIT_EMU_VECTOR1(T, name, a1) FREEDIT_EMU_VECTOR2(T, name, a2) FREEDIT_EMU_VECTOR3(T, name)   \
  FREEDIT_EMU_VECTOR4(T, name, a4)

FREEDIT_EMU_VECTORS(signed char, char, 1, 2, 4)
FREEDIT_EMU_VECTORS(unsigned char, uchar, 1, 2, 4)
FREEDIT_EMU_VECTORS(short, short, 2, 4, 8)
FREEDIT_EMU_VECTORS(unsigned short, ushort, 2, 4, 8)
FREEDIT_EMU_VECTORS(int, int, 4, 8, 16)
FREEDIT_EMU_VECTORS(unsigned int, uint, 4, 8, 16)
FREEDIT_EMU_VECTORS(long long, longlong, 8, 16, 16)
FREEDIT_EMU_VECTORS(unsigned long long, ulonglong, 8, 16, 16)
FREEDIT_EMU_VECTORS(float, float, 4, 8, 16)
FREEDIT_EMU_VECTORS(double, double, 8, 16, 16)

#undef FREEDIT_EMU_VECTORS
#undef FREEDIT_EMU_VECTOR1
#undef FREEDIT_EMU_VECTOR2
#undef FREEDIT_EMU_VECTOR3
#undef FREEDIT_EMU_VECTOR4

// Launch dimensions: unspecified components are 1, as in CUDA.
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
};
