// tile_cpu.cpp: the tile template on the CPU (OpenMP), forward and backward
// (math.md 1.1-1.5, 2.1, 2.2; python/tilecl/_torch_tiled.py is the reference of the contract).
//
// Schedule: rows are cut into blocks of BR, columns into blocks of BC. Row blocks are dealt to
// a few groups per thread (rb mod groups); threads take groups dynamically and sweep all column
// blocks of each row block; no barrier inside the sweep, so a descheduled thread on a loaded
// machine just takes fewer groups. Column-side results go to per-group partials merged in group
// order at the end: deterministic whatever the thread count and scheduling.
//   forward: column LSE partials, 2 x groups x M;
//   backward: dk partials, (groups - 1) x M x D, groups limited by TILECL_CPU_DK_BUFFER_MB
//     (default 256 MiB); when not even 2 groups fit, a second sweep over column blocks
//     recomputes the tiles for dk (no extra memory, 4/3 of the GEMM work).
// Never anything N x M: a few [BR, BC] / [BC, D] tiles per thread.
#ifdef _OPENMP
#include <omp.h>
#else  // built without OpenMP: one thread
static inline int omp_get_max_threads() { return 1; }
static inline int omp_get_thread_num() { return 0; }
#endif

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <stdexcept>
#include <vector>

#include "../tile_api.h"
#include "epilogue_vec.h"
#include "gemm.h"
#include "tiles.h"

namespace tilecl {
namespace cpu {
namespace {



// Threads for a problem: the caller's count (torch.get_num_threads()), but one thread for small
// problems, where waking a pool costs more than the work (badly so on a loaded machine).
int num_threads(int threads, int64_t n, int64_t m, int64_t d) {
  const int nt = threads > 0 ? threads : omp_get_max_threads();
  const double work = double(n) * double(m) * double(d + 32);
  const int64_t by_work = static_cast<int64_t>(work / double(1 << 22)) + 1;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nt, by_work)));
}

// Row blocks are dealt to `groups` groups (rb mod groups); OpenMP threads take whole groups
// dynamically (a descheduled thread on a loaded machine just takes fewer groups), and a group's
// row blocks run in order on one thread. Column-side partials belong to groups, not threads:
// deterministic for any number of threads and any scheduling. For each row block rb of group g:
// row_begin(t, rb), tile(t, g, rb, cb) for every column block, row_end(t, rb); t = thread.
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
int64_t row_groups(int64_t n, int nt, int64_t cap) {
  const int64_t nrb = (n + BR - 1) / BR;
  return std::max<int64_t>(1, std::min<int64_t>({nrb, 4 * (int64_t)nt, cap}));
}

// The array epilogue (epilogue_vec.h) unless TILECL_CPU_SCALAR=1 asks for the element functions
// of tile_math.h, the ones the CUDA kernels run (the tests cover both).
bool use_array_epilogue() {
  const char* env = std::getenv("TILECL_CPU_SCALAR");
  return !(env && env[0] == '1');
}

template <typename T>
Aux<T> make_aux(const Problem& p) {
  Aux<T> a;
  a.excl = p.excl;
  a.pos = p.pos;
  a.labels_q = p.labels_q;
  a.labels_k = p.labels_k;
  a.weight = static_cast<const T*>(p.weight);
  a.mw = p.mw;
  a.wa = static_cast<const T*>(p.wa);
  a.wb = static_cast<const T*>(p.wb);
  a.rank = p.rank;
  a.col_offset = p.col_offset;
  return a;
}

// Column block size: BC, shrunk when there are fewer column blocks than threads (the second
// backward sweep is parallel over column blocks).
int64_t col_block(int64_t m, int nt) {
  int64_t bc = BC;
  while (bc > NR && (m + bc - 1) / bc < nt) bc /= 2;
  return bc;
}

// Logits of tile (rb, cb) into s.x (and the weights into s.w); returns (rows, cols) of the tile.
template <typename T, bool DIST, int WMODE>
void tile_logits(const Problem& p, const Aux<T>& aux, const PackedK<T>& pk, Scratch<T>& s, int64_t i0,
                 int64_t br, int64_t j0, int64_t bc, bool keep_inner) {
  const int64_t d = p.d;
  pk.select(j0, &s.kr, &s.kt, &s.nk);
  gemm(BR, s.bc, d, s.qr.data(), s.dp, s.kt, s.bc, s.x.data(), s.bc, false);  // [BR, D] @ [D, BC]
  const T* alpha = static_cast<const T*>(p.alpha);
  const T bias = p.bias ? *static_cast<const T*>(p.bias) : T(0);
  const T gamma = static_cast<T>(p.spec.gamma), clip = static_cast<T>(p.spec.weight_clip);
  for (int64_t r = 0; r < br; ++r) {
    T* xr = s.x.data() + r * s.bc;
    const T a = alpha[i0 + r], nq = s.nq[r];
    T* ir = keep_inner ? s.inner.data() + r * s.bc : nullptr;
    for (int64_t c = 0; c < bc; ++c) {
      const T in = DIST ? dist2(xr[c], nq, s.nk[c]) : xr[c];
      if (ir) ir[c] = in;
      xr[c] = logit_of<DIST>(in, a, bias, gamma);
    }
    if (WMODE != W_NONE) {
      T* wr = s.w.data() + r * s.bc;
      for (int64_t c = 0; c < bc; ++c) wr[c] = weight_of<WMODE>(aux, clip, i0 + r, j0 + c, j0 + c + aux.col_offset);
    }
  }
}

template <int POS, typename T>
inline Elem<T> elem_at(const Aux<T>& aux, const Scratch<T>& s, int64_t i, int64_t r, int64_t jl,
                       int64_t c) {
  Elem<T> e;
  const int64_t col = aux.col_offset + jl;
  e.x = s.x[r * s.bc + c];
  e.allowed = aux.excl == nullptr || aux.excl[i] != col;
  e.y = e.allowed && is_positive<POS>(aux, i, jl, col);
  e.w = s.w[r * s.bc + c];
  return e;
}

// ---------------------------------------------------------------------------------------------
// forward: per-row online accumulators (math.md 1.1) and the column LSE (2.1)
// ---------------------------------------------------------------------------------------------
template <typename T, bool DIST, int POS, int WMODE>
void forward_impl(const Problem& p, const ForwardOut& out) {
  const Spec& sp = p.spec;
  const Aux<T> aux = make_aux<T>(p);
  const int nt = num_threads(p.threads, p.n, p.m, p.d);
  const int64_t n = p.n, m = p.m, d = p.d, bc = col_block(m, nt);
  const bool fast = use_array_epilogue();
  T* stats = static_cast<T*>(out.stats);
  // running column (max, sum) per row-block group, merged in group order into out.col
  const int64_t groups = row_groups(n, nt, INT64_MAX);
  std::vector<T> col_m, col_l;
  if (sp.col_lse) {
    col_m.assign((size_t)groups * m, neg_inf<T>());
    col_l.assign((size_t)groups * m, T(0));
  }
  // running row state: max and sum of each accumulator, per row of the block, per thread
  std::vector<Scratch<T>> scratch;
  scratch.reserve(nt);
  for (int t = 0; t < nt; ++t) scratch.emplace_back(d, bc, false);
  PackedK<T> pk;
  pk.build(p.k, p.dtype, p.sk0, p.sk1, m, d, bc, DIST, nt);
  std::vector<T> rstate((size_t)nt * 5 * BR);  // m0, l0, m1, l1 | lin, cnt, sig live in stats

  auto row_begin = [&](int64_t t, int64_t rb) {
    Scratch<T>& s = scratch[t];
    const int64_t i0 = rb * BR, br = std::min(BR, n - i0);
    load_rows<T>(p.q, p.dtype, p.sq0, p.sq1, i0, br, d, s.qr.data(), s.dp, BR);
    if (DIST) row_norms<T>(s.qr.data(), s.dp, br, d, s.nq.data());
    T* st = rstate.data() + t * 5 * BR;
    for (int64_t r = 0; r < BR; ++r) {
      st[r] = st[2 * BR + r] = neg_inf<T>();
      st[BR + r] = st[3 * BR + r] = T(0);
    }
    for (int64_t row = sp.n_sums; row < sp.n_stats(); ++row)
      for (int64_t r = 0; r < br; ++r) stats[row * n + i0 + r] = T(0);
  };

  auto tile = [&](int64_t t, int64_t g, int64_t rb, int64_t cb) {
    Scratch<T>& s = scratch[t];
    const int64_t i0 = rb * BR, br = std::min(BR, n - i0);
    const int64_t j0 = cb * bc, bcc = std::min(bc, m - j0);
    tile_logits<T, DIST, WMODE>(p, aux, pk, s, i0, br, j0, bcc, false);
    T* st = rstate.data() + t * 5 * BR;
    if (fast) {
      for (int64_t r = 0; r < br; ++r) {
        const int64_t i = i0 + r;
        const T* xr = s.x.data() + r * s.bc;
        const T* wr = WMODE != W_NONE ? s.w.data() + r * s.bc : nullptr;
        row_masks<POS>(aux, i, j0, bcc, s.ma.data(), s.my.data());
        for (int k = 0; k < sp.n_sums; ++k)
          fwd_row_sum(sp, k, xr, s.ma.data(), s.my.data(), wr, bcc, st[2 * k * BR + r],
                      st[(2 * k + 1) * BR + r], s.z.data());
        if (sp.lin || sp.sigmoid) {
          T lin = T(0), cnt = T(0), sig = T(0);
          fwd_row_linear(sp, xr, s.ma.data(), s.my.data(), bcc, lin, cnt, sig);
          if (sp.lin) {
            stats[sp.i_lin() * n + i] += lin;
            stats[sp.i_cnt() * n + i] += cnt;
          }
          if (sp.sigmoid) stats[sp.i_sig() * n + i] += sig;
        }
      }
      if (sp.col_lse) {
        for (int64_t r = 0; r < br; ++r) {
          const int64_t e = aux.excl ? aux.excl[i0 + r] - aux.col_offset - j0 : -1;
          s.ex[r] = (e >= 0 && e < bcc) ? e : -1;
        }
        fwd_col_tile(s.x.data(), s.bc, br, bcc, s.ex.data(), col_m.data() + g * m + j0,
                     col_l.data() + g * m + j0, s.tmax.data(), s.ref.data());
      }
      return;
    }
    for (int64_t r = 0; r < br; ++r) {
      const int64_t i = i0 + r;
      for (int k = 0; k < sp.n_sums; ++k) {
        const T beta = static_cast<T>(sp.beta[k]);
        T& mk = st[2 * k * BR + r];
        T& lk = st[(2 * k + 1) * BR + r];
        T tmax = neg_inf<T>();
        for (int64_t c = 0; c < bcc; ++c) {
          const Elem<T> e = elem_at<POS>(aux, s, i, r, j0 + c, c);
          if (sum_sees(sp, k, e)) tmax = t_max(tmax, beta * e.x);
        }
        if (tmax == neg_inf<T>()) continue;  // nothing new for this accumulator
        const T mnew = t_max(mk, tmax);
        T l = lse_rescale(lk, mk, mnew);
        for (int64_t c = 0; c < bcc; ++c)
          l += sum_term(sp, k, elem_at<POS>(aux, s, i, r, j0 + c, c), mnew);
        mk = mnew;
        lk = l;
      }
      if (sp.lin || sp.sigmoid) {
        T lin = T(0), cnt = T(0), sig = T(0);
        for (int64_t c = 0; c < bcc; ++c) {
          const Elem<T> e = elem_at<POS>(aux, s, i, r, j0 + c, c);
          if (e.y) {
            lin += e.x;
            cnt += T(1);
          }
          if (sp.sigmoid) sig += sig_term(e);
        }
        if (sp.lin) {
          stats[sp.i_lin() * n + i] += lin;
          stats[sp.i_cnt() * n + i] += cnt;
        }
        if (sp.sigmoid) stats[sp.i_sig() * n + i] += sig;
      }
    }
    if (sp.col_lse) {  // column LSE over allowed rows, into this thread's partial
      T* cm = col_m.data() + g * m;
      T* cl = col_l.data() + g * m;
      for (int64_t c = 0; c < bcc; ++c) {
        const int64_t j = j0 + c, col = aux.col_offset + j;
        T tmax = neg_inf<T>();
        for (int64_t r = 0; r < br; ++r)
          if (aux.excl == nullptr || aux.excl[i0 + r] != col) tmax = t_max(tmax, s.x[r * s.bc + c]);
        if (tmax == neg_inf<T>()) continue;
        const T mnew = t_max(cm[j], tmax), ref = lse_ref(mnew);
        T l = lse_rescale(cl[j], cm[j], mnew);
        for (int64_t r = 0; r < br; ++r)
          if (aux.excl == nullptr || aux.excl[i0 + r] != col) l += t_exp(s.x[r * s.bc + c] - ref);
        cm[j] = mnew;
        cl[j] = l;
      }
    }
  };

  auto row_end = [&](int64_t t, int64_t rb) {
    const int64_t i0 = rb * BR, br = std::min(BR, n - i0);
    const T* st = rstate.data() + t * 5 * BR;
    for (int k = 0; k < sp.n_sums; ++k)
      for (int64_t r = 0; r < br; ++r)
        stats[k * n + i0 + r] = lse_finish(st[2 * k * BR + r], st[(2 * k + 1) * BR + r]);
  };

  sweep_rows(n, m, bc, nt, groups, row_begin, tile, row_end);
  if (sp.col_lse) {
    T* col = static_cast<T*>(out.col);
    for (int64_t j = 0; j < m; ++j) {
      T mj = neg_inf<T>(), lj = T(0);
      for (int64_t g = 0; g < groups; ++g) {  // merge the partials in group order
        const T mt = col_m[g * m + j];
        if (col_l[g * m + j] == T(0)) continue;
        const T mnew = t_max(mj, mt);
        lj = lse_rescale(lj, mj, mnew) + lse_rescale(col_l[g * m + j], mt, mnew);
        mj = mnew;
      }
      col[j] = lse_finish(mj, lj);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// backward: G_ij (math.md 1.2), dq_i += H_ij k_j and dk_j += H_ij q_i (1.3, 1.4)
// ---------------------------------------------------------------------------------------------
template <typename T, bool DIST, int POS, int WMODE>
void backward_impl(const Problem& p, const BackwardIO& io) {
  const Spec& sp = p.spec;
  const Aux<T> aux = make_aux<T>(p);
  const int nt = num_threads(p.threads, p.n, p.m, p.d);
  const int64_t n = p.n, m = p.m, d = p.d, bc = col_block(m, nt);
  const bool fast = use_array_epilogue();
  const T* stats = static_cast<const T*>(io.stats);
  const T* g_stats = static_cast<const T*>(io.g_stats);
  const T* colv = static_cast<const T*>(io.col);
  const T* g_col = static_cast<const T*>(io.g_col);
  T* dq = static_cast<T*>(io.dq);
  T* dk = static_cast<T*>(io.dk);
  T* gx = static_cast<T*>(io.gx);
  T* gsum = static_cast<T*>(io.gsum);
  const T* alpha = static_cast<const T*>(p.alpha);
  const T gamma = static_cast<T>(p.spec.gamma);
  const bool has_col = sp.col_lse && colv != nullptr && g_col != nullptr;
  std::vector<Scratch<T>> scratch;
  scratch.reserve(nt);
  for (int t = 0; t < nt; ++t) scratch.emplace_back(d, bc, true);
  PackedK<T> pk;
  pk.build(p.k, p.dtype, p.sk0, p.sk1, m, d, bc, DIST, nt);
  std::vector<RowGrad<T>> rgrad((size_t)nt * BR);

  auto row_begin = [&](int64_t t, int64_t rb) {
    Scratch<T>& s = scratch[t];
    const int64_t i0 = rb * BR, br = std::min(BR, n - i0);
    load_rows<T>(p.q, p.dtype, p.sq0, p.sq1, i0, br, d, s.qr.data(), s.dp, BR);
    if (DIST) row_norms<T>(s.qr.data(), s.dp, br, d, s.nq.data());
    for (int64_t r = 0; r < br; ++r) rgrad[t * BR + r] = make_row_grad(sp, stats, g_stats, n, i0 + r);
    std::fill(s.dq.begin(), s.dq.end(), T(0));
    std::fill(s.rowh.begin(), s.rowh.end(), T(0));
  };

  // row_side: dq, gx, gsum of the rows; dk_out: where dk of the columns goes (null: not here)
  auto tile = [&](int64_t t, int64_t rb, int64_t cb, bool row_side, T* dk_out) {
    Scratch<T>& s = scratch[t];
    const int64_t i0 = rb * BR, br = std::min(BR, n - i0);
    const int64_t j0 = cb * bc, bcc = std::min(bc, m - j0);
    tile_logits<T, DIST, WMODE>(p, aux, pk, s, i0, br, j0, bcc, DIST);
    if (DIST) std::fill(s.colh.begin(), s.colh.end(), T(0));
    if (fast && has_col)  // safe column statistics of the tile (g = 0 where lse = -inf)
      for (int64_t c = 0; c < bcc; ++c) {
        const bool empty = colv[j0 + c] == neg_inf<T>();
        s.lc[c] = empty ? T(0) : colv[j0 + c];
        s.gc[c] = empty ? T(0) : g_col[j0 + c];
      }
    // G and H = G * dx/d(inner), in place of the logits; padding stays 0 for the GEMMs
    for (int64_t r = 0; r < BR; ++r) {
      T* xr = s.x.data() + r * s.bc;
      if (r >= br) {
        std::fill(xr, xr + s.bc, T(0));
        continue;
      }
      const int64_t i = i0 + r;
      const RowGrad<T>& rg = rgrad[t * BR + r];
      const T a = alpha[i];
      double sum_gx = 0.0, sum_g = 0.0, sum_h = 0.0;  // row sums in double: they cancel
      if (fast) {
        T* G = s.g.data();
        row_masks<POS>(aux, i, j0, bcc, s.ma.data(), s.my.data());
        bwd_row_grad(sp, rg, static_cast<const T*>(xr), s.ma.data(), s.my.data(),
                     WMODE != W_NONE ? s.w.data() + r * s.bc : nullptr,
                     has_col ? s.lc.data() : nullptr, has_col ? s.gc.data() : nullptr, bcc, G,
                     s.z.data());
        if (DIST) {
          const T* in = s.inner.data() + r * s.bc;
          for (int64_t c = 0; c < bcc; ++c) {
            const T H = G[c] * h_factor<DIST>(in[c], a, gamma);
            sum_g += G[c];
            sum_gx += G[c] * xr[c];
            sum_h += H;
            s.colh[c] += H;
            xr[c] = H;
          }
        } else {
          for (int64_t c = 0; c < bcc; ++c) {
            sum_g += G[c];
            xr[c] = G[c] * a;
          }
        }
      }
      for (int64_t c = 0; c < (fast ? 0 : bcc); ++c) {
        const Elem<T> e = elem_at<POS>(aux, s, i, r, j0 + c, c);
        T lse_c = T(0), g_c = T(0);
        if (has_col && colv[j0 + c] != neg_inf<T>()) {
          lse_c = colv[j0 + c];
          g_c = g_col[j0 + c];
        }
        const T G = grad_coef(sp, e, rg, has_col, lse_c, g_c);
        sum_g += G;
        T H;
        if (DIST) {
          sum_gx += G * e.x;
          H = G * h_factor<DIST>(s.inner[r * s.bc + c], a, gamma);
          sum_h += H;
          s.colh[c] += H;
        } else {
          H = G * a;
        }
        xr[c] = H;
      }
      for (int64_t c = bcc; c < s.bc; ++c) xr[c] = T(0);
      if (row_side) {
        if (DIST && gx) gx[i] += static_cast<T>(sum_gx);
        if (gsum) gsum[i] += static_cast<T>(sum_g);
        if (DIST) s.rowh[r] += static_cast<T>(sum_h);
      }
    }
    if (row_side && dq) gemm(BR, s.dp, s.bc, s.x.data(), s.bc, s.kr, s.dp, s.dq.data(), s.dp, true);  // [BR, BC] @ [BC, D]
    if (dk_out) {
      transpose_into<T>(s.x.data(), s.bc, BR, s.bc, s.ht.data(), BR);  // ht [BC, BR] = H^T
      gemm(s.bc, s.dp, BR, s.ht.data(), BR, s.qr.data(), s.dp, s.tmp.data(), s.dp, false);  // [BC, BR] @ [BR, D]
      for (int64_t c = 0; c < bcc; ++c) {
        T* o = dk_out + (j0 + c) * d;
        const T* g = s.tmp.data() + c * s.dp;
        const T* kc = s.kr + c * s.dp;
        if (DIST) {
          const T h = s.colh[c];
          for (int64_t e = 0; e < d; ++e) o[e] += g[e] - h * kc[e];
        } else {
          for (int64_t e = 0; e < d; ++e) o[e] += g[e];
        }
      }
    }
  };

  auto row_end = [&](int64_t t, int64_t rb) {
    if (!dq) return;
    Scratch<T>& s = scratch[t];
    const int64_t i0 = rb * BR, br = std::min(BR, n - i0);
    for (int64_t r = 0; r < br; ++r) {
      T* o = dq + (i0 + r) * d;
      const T* g = s.dq.data() + r * s.dp;
      const T* qv = s.qr.data() + r * s.dp;
      const T h = DIST ? s.rowh[r] : T(0);
      for (int64_t e = 0; e < d; ++e) o[e] += g[e] - h * qv[e];
    }
  };

  const bool rows_needed = dq || gx || gsum;
  const double budget_mb = [] {
    const char* env = std::getenv("TILECL_CPU_DK_BUFFER_MB");
    return env ? std::atof(env) : 256.0;
  }();
  // dk partials per row-block group (group 0 adds into dk): as many groups as the budget allows
  const double dk_mb = double(m) * d * sizeof(T) / (1024.0 * 1024.0);
  const int64_t cap = dk ? 1 + static_cast<int64_t>(budget_mb / std::max(dk_mb, 1e-9)) : INT64_MAX;
  const int64_t groups = row_groups(n, nt, cap);
  if (!dk || nt == 1 || groups >= 2) {
    std::vector<T> part(dk ? (size_t)(groups - 1) * m * d : 0, T(0));
    sweep_rows(n, m, bc, nt, groups, row_begin,
               [&](int64_t t, int64_t g, int64_t rb, int64_t cb) {
                 T* dk_g = !dk ? nullptr : (g == 0 ? dk : part.data() + (g - 1) * m * d);
                 tile(t, rb, cb, rows_needed, dk_g);
               },
               row_end);
    if (!part.empty()) {
#pragma omp parallel for schedule(static) num_threads(nt)
      for (int64_t j = 0; j < m; ++j)
        for (int64_t g = 1; g < groups; ++g) {  // fixed order: deterministic
          const T* src = part.data() + (g - 1) * m * d + j * d;
          for (int64_t e = 0; e < d; ++e) dk[j * d + e] += src[e];
        }
    }
  } else {
    // too large for partials: rows first (dq, gx, gsum), then a sweep over column blocks for dk
    if (rows_needed)
      sweep_rows(n, m, bc, nt, row_groups(n, nt, INT64_MAX), row_begin,
                 [&](int64_t t, int64_t, int64_t rb, int64_t cb) { tile(t, rb, cb, true, nullptr); },
                 row_end);
    const int64_t nrb = (n + BR - 1) / BR, ncb = (m + bc - 1) / bc;
#pragma omp parallel for schedule(static, 1) num_threads(nt)
    for (int64_t cb = 0; cb < ncb; ++cb) {
      const int t = omp_get_thread_num();
      for (int64_t rb = 0; rb < nrb; ++rb) {
        row_begin(t, rb);
        tile(t, rb, cb, false, dk);
      }
    }
  }
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

template <typename T, typename Fn>
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

void check(const Problem& p) {
  if (p.dtype < 0 || p.dtype > 3) throw std::invalid_argument("tilecl._C: unknown dtype code");
  if (p.n < 0 || p.m < 0 || p.d < 0) throw std::invalid_argument("tilecl._C: negative size");
  if (p.spec.n_sums < 0 || p.spec.n_sums > 2) throw std::invalid_argument("tilecl._C: n_sums");
  if (p.spec.weight != W_NONE && p.spec.weight == W_DENSE && p.mw <= 0)
    throw std::invalid_argument("tilecl._C: dense weights need Mw > 0");
}

}  // namespace

void cpu_forward(const Problem& p, const ForwardOut& out) {
  check(p);
  if (p.dtype == DT_F64) {
    dispatch<double>(p, [&](auto dist, auto pos, auto wm) {
      forward_impl<double, decltype(dist)::value, decltype(pos)::value, decltype(wm)::value>(p, out);
    });
  } else {
    dispatch<float>(p, [&](auto dist, auto pos, auto wm) {
      forward_impl<float, decltype(dist)::value, decltype(pos)::value, decltype(wm)::value>(p, out);
    });
  }
}

void cpu_backward(const Problem& p, const BackwardIO& io) {
  check(p);
  if (p.dtype == DT_F64) {
    dispatch<double>(p, [&](auto dist, auto pos, auto wm) {
      backward_impl<double, decltype(dist)::value, decltype(pos)::value, decltype(wm)::value>(p, io);
    });
  } else {
    dispatch<float>(p, [&](auto dist, auto pos, auto wm) {
      backward_impl<float, decltype(dist)::value, decltype(pos)::value, decltype(wm)::value>(p, io);
    });
  }
}

}  // namespace cpu

void cpu_forward(const Problem& p, const ForwardOut& out) { cpu::cpu_forward(p, out); }
void cpu_backward(const Problem& p, const BackwardIO& io) { cpu::cpu_backward(p, io); }

}  // namespace tilecl
