// tiles.h: loading, packing and scratch buffers of the CPU tile sweep: strided inputs of any
// supported dtype converted to the compute type once per row block (q) or once per call (k, in
// the two packed layouts the GEMMs of gemm.h read).
//
// ISA section: included by csrc/cpu/kernels.h inside namespace TCL_ISA.
#pragma once

namespace tilecl {
namespace cpu {
namespace TCL_ISA {

constexpr int64_t BR = 96;   // rows per block (multiple of MR)
constexpr int64_t BC = 256;  // columns per block (multiple of NR)

// Value of element `off` of an input of dtype code `dt`, as T.
template <typename T>
inline T load(const void* base, int dt, int64_t off) {
  switch (dt) {
    case DT_F32: return static_cast<T>(static_cast<const float*>(base)[off]);
    case DT_F64: return static_cast<T>(static_cast<const double*>(base)[off]);
    case DT_F16: return static_cast<T>(f16_bits_to_float(static_cast<const uint16_t*>(base)[off]));
    default: return static_cast<T>(bf16_bits_to_float(static_cast<const uint16_t*>(base)[off]));
  }
}

// rows [r0, r0 + nr) of x [*, d] (strides s0, s1, dtype dt) -> out [nr, d] row-major, as T.
template <typename T>
void load_rows(const void* x, int dt, int64_t s0, int64_t s1, int64_t r0, int64_t nr, int64_t d,
               T* out) {
  for (int64_t r = 0; r < nr; ++r) {
    T* o = out + r * d;
    const int64_t base = (r0 + r) * s0;
    if (s1 == 1 && ((dt == DT_F32 && sizeof(T) == 4) || (dt == DT_F64 && sizeof(T) == 8))) {
      std::memcpy(o, static_cast<const char*>(x) + base * sizeof(T), d * sizeof(T));
    } else {
      for (int64_t c = 0; c < d; ++c) o[c] = load<T>(x, dt, base + c * s1);
    }
  }
}

template <typename T>
void row_norms(const T* rows, int64_t nr, int64_t d, T* out) {
  for (int64_t r = 0; r < nr; ++r) {
    T s = T(0);
    for (int64_t c = 0; c < d; ++c) s += rows[r * d + c] * rows[r * d + c];
    out[r] = s;
  }
}

// K [M, D] in the compute type, packed once per call (O(M D) memory, like dk itself):
//   kt: K^T [D, M] in strips of NR columns (B of the logits GEMM x = Q_I K_J^T);
//       column block j0 (a multiple of NR) starts at kt + j0 * d;
//   kb: per column block of bc rows, K_J [bc, D] in strips of NR columns of D, bc rows per
//       strip (B of dq += H K_J); block cb starts at kb + cb * bc * dp;
//   nk: squared norms [M] (distance logits).
template <typename T>
struct PackedK {
  std::vector<T> kt, kb, nk;
  int64_t bc = 0, d = 0, dp = 0;
  void build(const void* k, int dt, int64_t s0, int64_t s1, int64_t m, int64_t d_, int64_t bc_,
             bool with_kb, bool norms, int threads) {
    bc = bc_;
    d = d_;
    dp = round_up(d, NR);
    const int64_t ncb = (m + bc - 1) / bc;
    kt.assign(round_up(m, NR) * d, T(0));
    kb.assign(with_kb ? ncb * bc * dp : 0, T(0));
    nk.assign(norms ? m : 0, T(0));
#pragma omp parallel num_threads(threads)
    {
      std::vector<T> rows(bc * d);
#pragma omp for schedule(static)
      for (int64_t cb = 0; cb < ncb; ++cb) {
        const int64_t j0 = cb * bc, nb = std::min(bc, m - j0);
        load_rows<T>(k, dt, s0, s1, j0, nb, d, rows.data());
        pack_bt(rows.data(), d, nb, d, kt.data() + j0 * d);
        if (with_kb) pack_b(rows.data(), d, nb, d, kb.data() + cb * bc * dp, bc);
        if (norms) row_norms(rows.data(), nb, d, nk.data() + j0);
      }
    }
  }
  const T* kt_block(int64_t j0) const { return kt.data() + j0 * d; }
  const T* kb_block(int64_t j0) const { return kb.data() + (j0 / bc) * bc * dp; }
  // element (c, e) of the column block at j0 (row c of K_J), from kb
  T at(int64_t j0, int64_t c, int64_t e) const {
    return kb_block(j0)[(e / NR) * bc * NR + c * NR + e % NR];
  }
};

// Per-thread scratch of the sweep. x holds the [BR, bc] tile (logits, then H in the backward),
// row-major with leading dimension ldx = bc + NR: not a power of two, so that the column chunks
// of H^T read by dk += H^T Q_I (stride ldx) do not all fall into the same few L1 sets.
template <typename T>
struct Scratch {
  int64_t d, dp, ldx;
  std::vector<T> qr;     // [BR, d]  the row block, compute type
  std::vector<T> qb;     // [dp/NR][BR][NR]  the row block packed as B (backward: dk += H^T Q_I)
  std::vector<T> x, e;   // [BR, ldx] logits (then H) ; exp(x - row max) (column LSE from rows)
  std::vector<T> w, inner;  // [BR, ldx] weights ; squared distances (distance logits, backward)
  std::vector<T> nq, tm, rowh;  // [BR]: squared norms, tile row max, sum_j H_ij (distance)
  std::vector<T> ma, my, z, g, lc, gc, cs, colh;  // [ldx] row / column vectors
  std::vector<int64_t> bad;  // columns whose LSE is recomputed exactly
  Scratch(int64_t d_, int64_t bc, bool weights, bool dist, bool bwd)
      : d(d_), dp(round_up(d_, NR)), ldx(bc + NR) {
    qr.assign(BR * d, T(0));
    x.assign(BR * ldx, T(0));
    if (weights) w.assign(BR * ldx, T(1));
    nq.assign(BR, T(0));
    tm.assign(BR, T(0));
    rowh.assign(BR, T(0));
    for (auto* v : {&ma, &my, &z, &g, &lc, &gc, &cs, &colh}) v->assign(ldx, T(0));
    bad.reserve(ldx);
    if (bwd) {
      qb.assign(dp * BR, T(0));
      if (dist) inner.assign(BR * ldx, T(0));
    } else {
      e.assign(BR * ldx, T(0));
    }
  }
};

}  // namespace TCL_ISA
}  // namespace cpu
}  // namespace tilecl
