// forward.h: the forward of the CPU tile sweep: per-row online accumulators (math.md 1.1), the
// linear / SigLIP row sums (4.1, 2.2), the column LSE of symmetric CLIP (2.1) and the streaming
// top-k list of each row's hardest negatives (TileSpec.topk).
//
// ISA section: included by csrc/cpu/kernels.h inside namespace TCL_ISA.
#pragma once

namespace tilecl {
namespace cpu {
namespace TCL_ISA {

template <typename T, bool DIST, int POS, int WMODE>
void forward_impl(const Problem& p) {
  const Spec& sp = p.spec;
  const ProblemT<T> tp = typed<T>(p);
  const Aux<T>& aux = tp.aux;
  const int nt = num_threads(p.threads, p.n, p.m, p.d);
  const int64_t n = p.n, m = p.m, d = p.d, bc = col_block(m, nt);
  const bool fast = use_array_epilogue();
  T* stats = tp.stats;
  // The column LSE reuses the exponentials of the first row sum when that one runs over all
  // allowed columns with beta 1 and no weights (math.md 2.1; _torch_tiled._col_lse): one exp per
  // element instead of two.
  const bool share = fast && sp.col_lse && sp.n_sums > 0 && sp.cols[0] == COLS_ALL &&
                     sp.beta[0] == 1.0 && !sp.weighted[0];
  // running column (max, sum) per row-block group, merged in group order into col
  const int64_t groups = row_groups(n, nt, INT64_MAX);
  std::vector<T> col_m, col_l;
  if (sp.col_lse) {
    col_m.assign((size_t)groups * m, neg_inf<T>());
    col_l.assign((size_t)groups * m, T(0));
  }
  std::vector<Scratch<T>> scratch;
  scratch.reserve(nt);
  for (int t = 0; t < nt; ++t) scratch.emplace_back(d, bc, WMODE != W_NONE, DIST, false);
  PackedK<T> pk;
  pk.build(p.k, p.dtype, p.sk0, p.sk1, m, d, bc, false, DIST, nt);
  // running row state per thread: max and sum of each accumulator (lin, cnt, sig live in stats)
  std::vector<T> rstate((size_t)nt * 4 * BR);
  // running top-k list per row of the thread's block: values, global columns, length
  const int64_t kk = p.topk;
  std::vector<T> top_v((size_t)nt * BR * kk);
  std::vector<int64_t> top_i((size_t)nt * BR * kk);
  std::vector<int> top_n((size_t)nt * BR);

  auto row_begin = [&](int t, int64_t rb) {
    Scratch<T>& s = scratch[t];
    const int64_t i0 = rb * BR, br = std::min(BR, n - i0);
    load_rows<T>(p.q, p.dtype, p.sq0, p.sq1, i0, br, d, s.qr.data());
    if (DIST) row_norms<T>(s.qr.data(), br, d, s.nq.data());
    T* st = rstate.data() + t * 4 * BR;
    for (int64_t r = 0; r < BR; ++r) {
      st[r] = st[2 * BR + r] = neg_inf<T>();
      st[BR + r] = st[3 * BR + r] = T(0);
    }
    for (int64_t row = sp.n_sums; row < sp.n_stats(); ++row)
      for (int64_t r = 0; r < br; ++r) stats[row * n + i0 + r] = T(0);
    std::fill(top_n.begin() + t * BR, top_n.begin() + (t + 1) * BR, 0);
  };

  auto topk_of_row = [&](int t, int64_t r, int64_t j0, const T* z, int64_t bcc) {
    const size_t at = ((size_t)t * BR + r) * kk;
    topk_row(z, bcc, aux.col_offset + j0, kk, top_v.data() + at, top_i.data() + at,
             top_n[t * BR + r]);
  };

  // the array epilogue of one tile (x: logits [br, bcc])
  auto tile_fast = [&](int t, Scratch<T>& s, T* st, int64_t g, int64_t i0, int64_t br,
                       int64_t j0, int64_t bcc) {
    const int64_t ldx = s.ldx;
    for (int64_t r = 0; r < br; ++r) {
      const int64_t i = i0 + r;
      T* xr = s.x.data() + r * ldx;
      const T* wr = WMODE != W_NONE ? s.w.data() + r * ldx : nullptr;
      row_masks<POS>(aux, i, j0, bcc, xr, s.ma.data(), s.my.data());
      for (int k = 0; k < sp.n_sums; ++k) {
        T* keep = share && k == 0 ? s.e.data() + r * ldx : nullptr;
        const T tm = fwd_row_sum(sp, k, xr, s.ma.data(), s.my.data(), wr, bcc, st[2 * k * BR + r],
                                 st[(2 * k + 1) * BR + r], s.z.data(), keep);
        if (keep) s.tm[r] = tm;
      }
      if (sp.lin || sp.sigmoid) {
        T lin = T(0), cnt = T(0), sig = T(0);
        fwd_row_linear(sp, xr, s.ma.data(), s.my.data(), bcc, lin, cnt, sig);
        if (sp.lin) {
          stats[sp.i_lin() * n + i] += lin;
          stats[sp.i_cnt() * n + i] += cnt;
        }
        if (sp.sigmoid) stats[sp.i_sig() * n + i] += sig;
      }
      if (kk) {
        negative_logits(static_cast<const T*>(xr), s.ma.data(), s.my.data(), bcc, s.z.data());
        topk_of_row(t, r, j0, s.z.data(), bcc);
      }
      if (sp.col_lse) mask_row(xr, s.ma.data(), bcc);
    }
    if (!sp.col_lse) return;
    T* cm = col_m.data() + g * m + j0;
    T* cl = col_l.data() + g * m + j0;
    if (share) {
      const T C = fwd_col_from_rows(s.e.data(), ldx, s.tm.data(), br, bcc, s.cs.data());
      fwd_col_merge(s.x.data(), ldx, br, bcc, C, s.cs.data(), cm, cl, s.bad);
    } else {
      fwd_col_tile(s.x.data(), ldx, br, bcc, cm, cl, s.z.data(), s.g.data());
    }
  };

  // the element functions of tile_math.h (TILECL_CPU_SCALAR=1), as the CUDA kernels run them
  auto tile_scalar = [&](int t, Scratch<T>& s, T* st, int64_t g, int64_t i0, int64_t br,
                         int64_t j0, int64_t bcc) {
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
      if (kk) {
        for (int64_t c = 0; c < bcc; ++c) {
          const Elem<T> e = elem_at<POS>(aux, s, i, r, j0 + c, c);
          s.z[c] = e.allowed && !e.y ? e.x : neg_inf<T>();
        }
        topk_of_row(t, r, j0, s.z.data(), bcc);
      }
    }
    if (!sp.col_lse) return;
    T* cm = col_m.data() + g * m;
    T* cl = col_l.data() + g * m;
    for (int64_t c = 0; c < bcc; ++c) {  // column LSE over allowed rows
      const int64_t j = j0 + c;
      T tmax = neg_inf<T>();
      for (int64_t r = 0; r < br; ++r) {
        const Elem<T> e = elem_at<POS>(aux, s, i0 + r, r, j, c);
        if (e.allowed) tmax = t_max(tmax, e.x);
      }
      if (tmax == neg_inf<T>()) continue;
      const T mnew = t_max(cm[j], tmax), ref = lse_ref(mnew);
      T l = lse_rescale(cl[j], cm[j], mnew);
      for (int64_t r = 0; r < br; ++r) {
        const Elem<T> e = elem_at<POS>(aux, s, i0 + r, r, j, c);
        if (e.allowed) l += t_exp(e.x - ref);
      }
      cm[j] = mnew;
      cl[j] = l;
    }
  };

  auto tile = [&](int t, int64_t g, int64_t rb, int64_t cb) {
    Scratch<T>& s = scratch[t];
    const int64_t i0 = rb * BR, br = std::min(BR, n - i0);
    const int64_t j0 = cb * bc, bcc = std::min(bc, m - j0);
    tile_logits<T, DIST, WMODE>(p, aux, pk, s, i0, br, j0, bcc, false);
    T* st = rstate.data() + t * 4 * BR;
    if (fast) {
      tile_fast(t, s, st, g, i0, br, j0, bcc);
    } else {
      tile_scalar(t, s, st, g, i0, br, j0, bcc);
    }
  };

  auto row_end = [&](int t, int64_t rb) {
    const int64_t i0 = rb * BR, br = std::min(BR, n - i0);
    const T* st = rstate.data() + t * 4 * BR;
    for (int k = 0; k < sp.n_sums; ++k)
      for (int64_t r = 0; r < br; ++r)
        stats[k * n + i0 + r] = lse_finish(st[2 * k * BR + r], st[(2 * k + 1) * BR + r]);
    T* vals = tp.top_vals;
    for (int64_t r = 0; r < br && kk; ++r) {  // the lists, padded with -inf / -1
      const size_t at = ((size_t)t * BR + r) * kk;
      for (int u = 0; u < kk; ++u) {
        const bool has = u < top_n[t * BR + r];
        vals[(i0 + r) * kk + u] = has ? top_v[at + u] : neg_inf<T>();
        p.top_idx[(i0 + r) * kk + u] = has ? top_i[at + u] : -1;
      }
    }
  };

  sweep_rows(n, m, bc, nt, groups, row_begin, tile, row_end);
  if (sp.col_lse) {
    T* col = tp.col;
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

}  // namespace TCL_ISA
}  // namespace cpu
}  // namespace tilecl
