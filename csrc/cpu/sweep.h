// sweep.h: schedule of the CPU tile sweep and the pieces its forward (forward.h) and backward
// (backward.h) share: the logits of a tile, the element view of the scalar path, the dispatch of
// the structural flags to template parameters. math.md 1.1-1.5, 2.1, 2.2;
// python/tilecl/_torch_tiled.py is the reference of the contract.
//
// Schedule: rows are cut into blocks of BR, columns into blocks of bc (BC, or less for few
// columns). Row blocks are dealt to a few groups per thread (rb mod groups); threads take groups
// dynamically and sweep all column blocks of each row block; no barrier inside the sweep, so a
// descheduled thread on a loaded machine just takes fewer groups. Column-side results go to
// per-group partials merged in group order at the end: deterministic whatever the thread count
// and scheduling. Never anything N x M: a few [BR, bc] tiles per thread.
//
// ISA section: included by csrc/cpu/kernels.h inside namespace TCL_ISA.
#pragma once

namespace tilecl {
namespace cpu {
namespace TCL_ISA {

// Threads for a problem: the caller's count (torch.get_num_threads()), but one thread for small
// problems, where waking a pool costs more than the work (badly so on a loaded machine).
inline int num_threads(int threads, int64_t n, int64_t m, int64_t d) {
  const int nt = threads > 0 ? threads : omp_get_max_threads();
  const double work = double(n) * double(m) * double(d + 32);
  const int64_t by_work = static_cast<int64_t>(work / double(1 << 22)) + 1;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nt, by_work)));
}

// For each row block rb of group g (rb mod groups == g), on the thread t that took the group:
// row_begin(t, rb), tile(t, g, rb, cb) for every column block, row_end(t, rb).
template <typename RowBegin, typename Tile, typename RowEnd>
void sweep_rows(int64_t n, int64_t m, int64_t bc, int nt, int64_t groups, RowBegin row_begin,
                Tile tile, RowEnd row_end) {
  const int64_t nrb = (n + BR - 1) / BR, ncb = (m + bc - 1) / bc;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
  for (int64_t g = 0; g < groups; ++g) {
    const int t = omp_get_thread_num();
    for (int64_t rb = g; rb < nrb; rb += groups) {
      row_begin(t, rb);
      for (int64_t cb = 0; cb < ncb; ++cb) tile(t, g, rb, cb);
      row_end(t, rb);
    }
  }
}

// Number of row-block groups: a few per thread for balance, at most one per row block.
inline int64_t row_groups(int64_t n, int nt, int64_t cap) {
  const int64_t nrb = (n + BR - 1) / BR;
  return std::max<int64_t>(1, std::min<int64_t>({nrb, 4 * (int64_t)nt, cap}));
}

// The array epilogue (epilogue_vec.h) unless TILECL_CPU_SCALAR=1 asks for the element functions
// of tile_math.h, the ones the CUDA kernels run (the tests cover both).
inline bool use_array_epilogue() {
  const char* env = std::getenv("TILECL_CPU_SCALAR");
  return !(env && env[0] == '1');
}

// Column block size: BC, halved (in multiples of NR) while there are fewer column blocks than
// threads (the column sweep of the backward is parallel over column blocks).
inline int64_t col_block(int64_t m, int nt) {
  int64_t bc = BC;
  while (bc > NR && (m + bc - 1) / bc < nt) bc = round_up(bc / 2, NR);
  return bc;
}

// Logits of tile (rows [i0, i0 + br), columns [j0, j0 + bcc)) into s.x (and the weights into
// s.w, the squared distances into s.inner when keep_inner). s.qr holds the row block.
template <typename T, bool DIST, int WMODE>
void tile_logits(const Problem& p, const Aux<T>& aux, const PackedK<T>& pk, Scratch<T>& s,
                 int64_t i0, int64_t br, int64_t j0, int64_t bcc, bool keep_inner) {
  const int64_t d = p.d, ldx = s.ldx;
  // raw dot products: [br, D] @ [D, bcc] (K^T packed once per call)
  gemm(br, round_up(bcc, NR), d, s.qr.data(), d, int64_t(1), pk.kt_block(j0), d, s.x.data(), ldx,
       false);
  const T* alpha = static_cast<const T*>(p.alpha);
  const T bias = p.bias ? *static_cast<const T*>(p.bias) : T(0);
  const T gamma = static_cast<T>(p.spec.gamma), clip = static_cast<T>(p.spec.weight_clip);
  for (int64_t r = 0; r < br; ++r) {
    T* xr = s.x.data() + r * ldx;
    const T a = alpha[i0 + r];
    if (!DIST) {  // x = alpha_i <q_i, k_j> + b, the scale applied after the dot (math.md 9.10)
#pragma omp simd
      for (int64_t c = 0; c < bcc; ++c) xr[c] = logit_of<false>(xr[c], a, bias, gamma);
    } else {  // x = -alpha_i d2^(gamma/2), d2 from the norms (math.md 1.4)
      const T nq = s.nq[r];
      const T* nk = pk.nk.data() + j0;
      T* ir = keep_inner ? s.inner.data() + r * ldx : nullptr;
      for (int64_t c = 0; c < bcc; ++c) {
        const T in = dist2(xr[c], nq, nk[c]);
        if (ir) ir[c] = in;
        xr[c] = logit_of<true>(in, a, bias, gamma);
      }
    }
    if (WMODE != W_NONE) {
      T* wr = s.w.data() + r * ldx;
      for (int64_t c = 0; c < bcc; ++c)
        wr[c] = weight_of<WMODE>(aux, clip, i0 + r, j0 + c, j0 + c + aux.col_offset);
    }
  }
}

// Element (r, c) of the current tile for the scalar path (make_elem of tile_math.h, with the
// logit and weight already in the scratch).
template <int POS, typename T>
inline Elem<T> elem_at(const Aux<T>& aux, const Scratch<T>& s, int64_t i, int64_t r, int64_t jl,
                       int64_t c) {
  Elem<T> e;
  const int64_t col = aux.col_offset + jl;
  e.x = s.x[r * s.ldx + c];
  e.allowed = aux.excl == nullptr || aux.excl[i] != col;
  e.y = e.allowed && is_positive<POS>(aux, i, jl, col);
  if (drops_false_negative(aux, i, e.x, e.y)) e.allowed = false;
  e.w = s.w.empty() ? T(1) : s.w[r * s.ldx + c];
  return e;
}

// ---- dispatch of the structural flags to template parameters (one template, no copies) ----
#define TCL_BOOL_SWITCH(COND, NAME, ...) \
  [&] {                                  \
    if (COND) {                          \
      constexpr bool NAME = true;        \
      return __VA_ARGS__();              \
    } else {                             \
      constexpr bool NAME = false;       \
      return __VA_ARGS__();              \
    }                                    \
  }()

#define TCL_INT3_SWITCH(VAL, NAME, ...)                                   \
  [&] {                                                                   \
    if ((VAL) == 1) { constexpr int NAME = 1; return __VA_ARGS__(); }     \
    else if ((VAL) == 2) { constexpr int NAME = 2; return __VA_ARGS__(); } \
    else { constexpr int NAME = 0; return __VA_ARGS__(); }                \
  }()

template <typename Fn>
void dispatch(const Problem& p, Fn&& fn) {
  TCL_BOOL_SWITCH(p.spec.logit == LOGIT_DIST, DIST, [&] {
    TCL_INT3_SWITCH(p.spec.positive, POS, [&] {
      TCL_INT3_SWITCH(p.spec.weight, WMODE, [&] {
        fn(std::integral_constant<bool, DIST>(), std::integral_constant<int, POS>(),
           std::integral_constant<int, WMODE>());
      });
    });
  });
}

}  // namespace TCL_ISA
}  // namespace cpu
}  // namespace tilecl
