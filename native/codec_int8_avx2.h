// Hand-written AVX2 INT8_ABSMAX block kernels, included by codec_kernels.h
// only in the AVX2 copy (PLC_INT8_SIMD). They perform exactly the operations
// of the generic path: absmax as an unsigned max over |bits|, scale =
// absmax/127 and inv = 127/absmax in scalar float, y = x*inv, round to nearest
// even via +1.5*2^23, clamp to [-127, 127]. Only the packing differs, so the
// bytes match the baseline path (tests force both and compare).
// No include guard: lives inside the PLC_KNS namespace of its includer.

static inline uint32_t hmax_epu32(__m256i v) {
  __m128i m = _mm_max_epu32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  m = _mm_max_epu32(m, _mm_shuffle_epi32(m, _MM_SHUFFLE(1, 0, 3, 2)));
  m = _mm_max_epu32(m, _mm_shuffle_epi32(m, _MM_SHUFFLE(2, 3, 0, 1)));
  return uint32_t(_mm_cvtsi128_si32(m));
}

static inline __m256i quant8(__m256 x, __m256 vinv) {
  const __m256 magic = _mm256_set1_ps(12582912.0f);
  __m256i q = _mm256_sub_epi32(_mm256_castps_si256(_mm256_add_ps(_mm256_mul_ps(x, vinv), magic)),
                               _mm256_set1_epi32(0x4B400000));
  q = _mm256_min_epi32(q, _mm256_set1_epi32(127));
  return _mm256_max_epi32(q, _mm256_set1_epi32(-127));
}

static inline uint32_t absmax_simd(const float* x, uint32_t n) {
  const __m256i absmask = _mm256_set1_epi32(0x7FFFFFFF);
  __m256i m0 = _mm256_setzero_si256(), m1 = m0, m2 = m0, m3 = m0;
  uint32_t i = 0;
  for (; i + 32 <= n; i += 32) {
    m0 = _mm256_max_epu32(m0, _mm256_and_si256(_mm256_loadu_si256((const __m256i*)(x + i)), absmask));
    m1 = _mm256_max_epu32(m1, _mm256_and_si256(_mm256_loadu_si256((const __m256i*)(x + i + 8)), absmask));
    m2 = _mm256_max_epu32(m2, _mm256_and_si256(_mm256_loadu_si256((const __m256i*)(x + i + 16)), absmask));
    m3 = _mm256_max_epu32(m3, _mm256_and_si256(_mm256_loadu_si256((const __m256i*)(x + i + 24)), absmask));
  }
  for (; i + 8 <= n; i += 8)
    m0 = _mm256_max_epu32(m0, _mm256_and_si256(_mm256_loadu_si256((const __m256i*)(x + i)), absmask));
  uint32_t am = hmax_epu32(_mm256_max_epu32(_mm256_max_epu32(m0, m1), _mm256_max_epu32(m2, m3)));
  for (; i < n; ++i) {
    uint32_t a = f2u(x[i]) & 0x7FFFFFFFu;
    am = a > am ? a : am;
  }
  return am;
}

static inline void quant_block(const float* x, uint32_t n, float inv, int8_t* q) {
  const __m256 vinv = _mm256_set1_ps(inv);
  const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  uint32_t i = 0;
  for (; i + 32 <= n; i += 32) {
    __m256i q0 = quant8(_mm256_loadu_ps(x + i), vinv);
    __m256i q1 = quant8(_mm256_loadu_ps(x + i + 8), vinv);
    __m256i q2 = quant8(_mm256_loadu_ps(x + i + 16), vinv);
    __m256i q3 = quant8(_mm256_loadu_ps(x + i + 24), vinv);
    // packs work per 128-bit lane; the permute restores element order.
    __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(q0, q1), _mm256_packs_epi32(q2, q3));
    _mm256_storeu_si256((__m256i*)(q + i), _mm256_permutevar8x32_epi32(b, perm));
  }
  for (; i + 8 <= n; i += 8) {
    __m256i v = quant8(_mm256_loadu_ps(x + i), vinv);
    __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    _mm_storel_epi64((__m128i*)(q + i), _mm_packs_epi16(w, w));
  }
  for (; i < n; ++i) q[i] = int8_t(clampi(rne_int(x[i] * inv), -127, 127));
}

// Encodes nb <= 8 consecutive blocks of bs elements (the last may be shorter:
// `last` elements) into consecutive records. Doing the absmax of a whole group
// first, then one vector division for all scales, keeps the per-block
// load -> max -> divide -> quantise latency chains overlapping.
// Returns the index of the first non-finite block in the group, or -1.
static int enc_int8_absmax_group(const float* x, uint32_t nb, uint32_t bs, uint32_t last,
                                 uint8_t* rec) {
  alignas(32) uint32_t am[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (uint32_t b = 0; b < nb; ++b) am[b] = absmax_simd(x + size_t(b) * bs, b + 1 == nb ? last : bs);
  for (uint32_t b = 0; b < nb; ++b)
    if (am[b] >= 0x7F800000u) return int(b);
  __m256 a = _mm256_load_ps(reinterpret_cast<const float*>(am));
  __m256 keep = _mm256_cmp_ps(a, _mm256_set1_ps(kTiny), _CMP_GE_OQ);
  alignas(32) float scale[8], inv[8];
  _mm256_store_ps(scale, _mm256_and_ps(keep, _mm256_div_ps(a, _mm256_set1_ps(127.0f))));
  _mm256_store_ps(inv, _mm256_and_ps(keep, _mm256_div_ps(_mm256_set1_ps(127.0f), a)));
  const uint64_t rb = 4 + uint64_t(bs);
  for (uint32_t b = 0; b < nb; ++b) {
    uint8_t* r = rec + b * rb;
    st32(r, scale[b]);
    quant_block(x + size_t(b) * bs, b + 1 == nb ? last : bs, inv[b], reinterpret_cast<int8_t*>(r + 4));
  }
  return -1;
}

static int enc_int8_absmax_simd(const float* x, uint32_t n, uint8_t* rec) {
  return enc_int8_absmax_group(x, 1, n, n, rec) < 0 ? kOk : kNonFinite;
}

// Returns how many leading elements it decoded (a multiple of 8).
static uint32_t dec_int8_simd(const int8_t* s8, uint32_t n, float scale, float* y) {
  const __m256 vs = _mm256_set1_ps(scale);
  uint32_t i = 0;
  for (; i + 32 <= n; i += 32) {
    __m256i b = _mm256_loadu_si256((const __m256i*)(s8 + i));
    __m128i lo = _mm256_castsi256_si128(b), hi = _mm256_extracti128_si256(b, 1);
    _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo)), vs));
    _mm256_storeu_ps(y + i + 8, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8))), vs));
    _mm256_storeu_ps(y + i + 16, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi)), vs));
    _mm256_storeu_ps(y + i + 24, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8))), vs));
  }
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                                              _mm_loadl_epi64((const __m128i*)(s8 + i)))), vs));
  return i;
}
