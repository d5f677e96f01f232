// backward.h: the backward of the CPU tile sweep: recompute the logits of each tile, form
// G_ij (math.md 1.2, 2.1, 2.2) and H = G dx/d(inner), then dq_I += H K_J and dk_J += H^T Q_I
// (1.3, 1.4) with the GEMMs of gemm.h.
//
// dk: the column side of a row-parallel sweep. Each row-block group accumulates into its own
// partial (group 0 straight into dk), (groups - 1) x M x D floats limited by
// TILECL_CPU_DK_BUFFER_MB (default 256 MiB), summed in group order at the end: deterministic.
// When not even 2 groups fit, a second sweep over column blocks recomputes the tiles for dk (no
// extra memory, 4/3 of the GEMM work). dq rows belong to one group: accumulated in place.
//
// ISA section: included by csrc/cpu/kernels.h inside namespace TCL_ISA.
#pragma once

namespace tilecl {
namespace cpu {
namespace TCL_ISA {

template <typename T, bool DIST, int POS, int WMODE>
void backward_impl(const Problem& p) {
  const Spec& sp = p.spec;
  const ProblemT<T> tp = typed<T>(p);
  const Aux<T>& aux = tp.aux;
  const int nt = num_threads(p.threads, p.n, p.m, p.d);
  const int64_t n = p.n, m = p.m, d = p.d, bc = col_block(m, nt);
  const bool fast = use_array_epilogue();
  const T* stats = tp.stats_in;
  const T* g_stats = tp.g_stats;
  const T* colv = tp.col_in;
  const T* g_col = tp.g_col;
  T* dq = tp.dq;
  T* dk = tp.dk;
  T* gx = tp.gx;
  T* gsum = tp.gsum;
  const T* alpha = tp.alpha;
  const T gamma = static_cast<T>(p.spec.gamma);
  const bool has_col = sp.col_lse && colv != nullptr && g_col != nullptr;
  std::vector<Scratch<T>> scratch;
  scratch.reserve(nt);
  for (int t = 0; t < nt; ++t) scratch.emplace_back(d, bc, WMODE != W_NONE, DIST, true);
  PackedK<T> pk;  // K_J as B of dq += H K_J (also read by the distance correction of dk)
  pk.build(p.k, p.dtype, p.sk0, p.sk1, m, d, bc, dq != nullptr || (DIST && dk != nullptr), DIST, nt);
  std::vector<RowGrad<T>> rgrad((size_t)nt * BR);

  auto row_begin = [&](int t, int64_t rb) {
    Scratch<T>& s = scratch[t];
    const int64_t i0 = rb * BR, br = std::min(BR, n - i0);
    load_rows<T>(p.q, p.dtype, p.sq0, p.sq1, i0, br, d, s.qr.data());
    if (DIST) row_norms<T>(s.qr.data(), br, d, s.nq.data());
    if (dk) pack_b(s.qr.data(), d, br, d, s.qb.data(), BR);  // Q_I as B of dk += H^T Q_I
    for (int64_t r = 0; r < br; ++r) rgrad[t * BR + r] = make_row_grad(sp, stats, g_stats, n, i0 + r);
    std::fill(s.rowh.begin(), s.rowh.end(), T(0));
  };

  // H of row r (in place of its logits) from G; row sums of G (gsum), G x (gx), H (distance)
  auto row_h = [&](Scratch<T>& s, int64_t r, T a, const T* G, int64_t bcc, bool row_side,
                   double& sum_g, double& sum_gx, double& sum_h) {
    T* xr = s.x.data() + r * s.ldx;
    if (DIST) {
      const T* in = s.inner.data() + r * s.ldx;
      for (int64_t c = 0; c < bcc; ++c) {
        const T H = G[c] * h_factor<DIST>(in[c], a, gamma);
        sum_g += G[c];
        sum_gx += G[c] * xr[c];
        sum_h += H;
        s.colh[c] += H;
        xr[c] = H;
      }
      return;
    }
    if (row_side && gsum) {
      double acc = 0.0;  // in double: the row sums of softmax gradients cancel
#pragma omp simd reduction(+ : acc)
      for (int64_t c = 0; c < bcc; ++c) acc += G[c];
      sum_g += acc;
    }
#pragma omp simd
    for (int64_t c = 0; c < bcc; ++c) xr[c] = G[c] * a;
  };

  // row_side: dq, gx, gsum of the rows; dk_out: where dk of the columns goes (null: not here)
  auto tile = [&](int t, int64_t rb, int64_t cb, bool row_side, T* dk_out) {
    Scratch<T>& s = scratch[t];
    const int64_t ldx = s.ldx;
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
    for (int64_t r = 0; r < br; ++r) {
      const int64_t i = i0 + r;
      const RowGrad<T>& rg = rgrad[t * BR + r];
      const T a = alpha[i];
      T* xr = s.x.data() + r * ldx;
      double sum_g = 0.0, sum_gx = 0.0, sum_h = 0.0;
      if (fast) {
        row_masks<POS>(aux, i, j0, bcc, xr, s.ma.data(), s.my.data());
        bwd_row_grad(sp, rg, static_cast<const T*>(xr), s.ma.data(), s.my.data(),
                     WMODE != W_NONE ? s.w.data() + r * ldx : nullptr,
                     has_col ? s.lc.data() : nullptr, has_col ? s.gc.data() : nullptr, bcc,
                     s.g.data(), s.z.data());
      } else {  // element functions of tile_math.h (TILECL_CPU_SCALAR=1)
        for (int64_t c = 0; c < bcc; ++c) {
          const Elem<T> e = elem_at<POS>(aux, s, i, r, j0 + c, c);
          T lse_c = T(0), g_c = T(0);
          if (has_col && colv[j0 + c] != neg_inf<T>()) {
            lse_c = colv[j0 + c];
            g_c = g_col[j0 + c];
          }
          s.g[c] = grad_coef(sp, e, rg, has_col, lse_c, g_c);
        }
      }
      row_h(s, r, a, s.g.data(), bcc, row_side, sum_g, sum_gx, sum_h);
      if (row_side) {
        if (DIST && gx) gx[i] += static_cast<T>(sum_gx);
        if (gsum) gsum[i] += static_cast<T>(sum_g);
        if (DIST) s.rowh[r] += static_cast<T>(sum_h);
      }
    }
    if (row_side && dq)  // dq_I += H K_J: [br, bcc] @ [bcc, D]
      gemm(br, d, bcc, s.x.data(), ldx, int64_t(1), pk.kb_block(j0), bc, dq + i0 * d, d, true);
    if (dk_out) {  // dk_J += H^T Q_I: [bcc, br] @ [br, D] (H^T read in place: rs 1, cs ldx)
      gemm(bcc, d, br, s.x.data(), int64_t(1), ldx, s.qb.data(), BR, dk_out + j0 * d, d, true,
           true);
      if (DIST)  // dk_j -= (sum_i H_ij) k_j
        for (int64_t c = 0; c < bcc; ++c) {
          T* o = dk_out + (j0 + c) * d;
          for (int64_t e = 0; e < d; ++e) o[e] -= s.colh[c] * pk.at(j0, c, e);
        }
    }
  };

  auto row_end = [&](int t, int64_t rb) {
    if (!DIST || !dq) return;
    Scratch<T>& s = scratch[t];  // dq_i -= (sum_j H_ij) q_i
    const int64_t i0 = rb * BR, br = std::min(BR, n - i0);
    for (int64_t r = 0; r < br; ++r)
      for (int64_t e = 0; e < d; ++e) dq[(i0 + r) * d + e] -= s.rowh[r] * s.qr[r * d + e];
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
               [&](int t, int64_t g, int64_t rb, int64_t cb) {
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
                 [&](int t, int64_t, int64_t rb, int64_t cb) { tile(t, rb, cb, true, nullptr); },
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

}  // namespace TCL_ISA
}  // namespace cpu
}  // namespace tilecl
