// soulchat._packer: the C++ packing core.
//
// Two entry points, both mirrored bit-exactly by pure-Python references in soulchat/data/packing.py:
//
//   pack(lengths int64 [n], capacity, seed) -> (row_offsets int64 [R+1], row_seqs int64 [n])
//       Best-fit decreasing bin packing, then a seeded shuffle of the row order.
//   assemble(tokens, trained, weight, seq_offsets, seq_ids) -> dict  (the packed micro-batch)
//
// The algorithm is specified completely so that the reference can reproduce it:
//   1. Visit sequences by length descending, ties by index ascending.
//   2. Each sequence goes into the open row with the SMALLEST remaining capacity >= its length. Among
//      rows with equal remaining capacity, take the one that reached that remaining capacity most
//      recently (a stack per remaining value). If no row fits, open a new row (rows are numbered in
//      opening order). A row whose remaining capacity drops to 0 is closed.
//   3. Row contents keep insertion order (so, longest first).
//   4. Shuffle the rows with Fisher-Yates driven by splitmix64(seed): for i = R-1 down to 1,
//      j = next() % (i + 1), swap(perm[i], perm[j]); output row r is packed row perm[r].
//
// Cost: counting sort O(n + C) (or an O(n log n) sort when C is large against n), then per sequence
// one O(log_64 C) search in a hierarchical bitset over remaining capacities plus O(1) stack work, so
// O(n log C) in all. Python is only touched to validate and to allocate the outputs; the work itself
// runs with the GIL released. Bad input raises ValueError (std::invalid_argument), never aborts.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;

namespace {

// Rows are at most this long. Memory for the search structure is ~4 bytes per unit of capacity, so
// this bound keeps it <= 64 MiB; real row sizes are a few thousand tokens.
constexpr int64_t kMaxCapacity = int64_t(1) << 24;

// ------------------------------------------------------------------------------------------------
// splitmix64: tiny, fully specified PRNG (Steele, Lea, Flood 2014), easy to replicate in Python.
struct SplitMix64 {
    uint64_t state;
    explicit SplitMix64(uint64_t seed) : state(seed) {}
    uint64_t next() {
        state += 0x9E3779B97F4A7C15ULL;
        uint64_t z = state;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
        return z ^ (z >> 31);
    }
};

// ------------------------------------------------------------------------------------------------
// Hierarchical bitset over [0, size): set / clear / find the smallest set index >= i, each in
// O(log_64 size) word operations. For C = 4096 that is three levels of 65, 2 and 1 words: the whole
// structure sits in L1, which is why this beats a balanced tree of rows by a wide margin.
class LevelBitset {
  public:
    explicit LevelBitset(int64_t size) {
        int64_t n = size;
        do {
            int64_t words = (n + 63) / 64;
            levels_.emplace_back(static_cast<size_t>(words), 0ULL);
            n = words;
        } while (n > 1);
    }

    void set(int64_t i) {
        for (auto& level : levels_) {
            uint64_t& w = level[static_cast<size_t>(i >> 6)];
            bool was_empty = (w == 0);
            w |= 1ULL << (i & 63);
            if (!was_empty) return;  // upper levels already mark this word as non-empty
            i >>= 6;
        }
    }

    void clear(int64_t i) {
        for (auto& level : levels_) {
            uint64_t& w = level[static_cast<size_t>(i >> 6)];
            w &= ~(1ULL << (i & 63));
            if (w != 0) return;  // word still non-empty: upper levels stay set
            i >>= 6;
        }
    }

    // Smallest set index >= i, or -1.
    int64_t find_next(int64_t i) const { return find_from(0, i); }

  private:
    int64_t find_from(size_t level, int64_t i) const {
        const auto& words = levels_[level];
        int64_t word = i >> 6;
        if (word >= static_cast<int64_t>(words.size())) return -1;
        uint64_t masked = words[static_cast<size_t>(word)] & (~0ULL << (i & 63));
        if (masked == 0) {
            if (level + 1 == levels_.size()) return -1;
            // The next non-empty word at this level is found one level up.
            int64_t next_word = find_from(level + 1, word + 1);
            if (next_word < 0) return -1;
            word = next_word;
            masked = words[static_cast<size_t>(word)];
        }
        return (word << 6) | __builtin_ctzll(masked);
    }

    std::vector<std::vector<uint64_t>> levels_;
};

// ------------------------------------------------------------------------------------------------
// Input checks. All raise std::invalid_argument, which pybind11 turns into ValueError.

py::array require_1d(const py::handle& obj, const char* name, const char* dtype_name, char kind,
                     py::ssize_t itemsize) {
    if (!py::isinstance<py::array>(obj)) {
        throw std::invalid_argument(std::string(name) + " must be a numpy array of " + dtype_name +
                                    ", got " + std::string(py::str(py::type::of(obj))));
    }
    auto arr = py::reinterpret_borrow<py::array>(obj);
    if (arr.ndim() != 1) {
        throw std::invalid_argument(std::string(name) + " must be 1-D, got " + std::to_string(arr.ndim()) +
                                    "-D: flatten it first");
    }
    if (arr.dtype().kind() != kind || arr.dtype().itemsize() != itemsize) {
        throw std::invalid_argument(std::string(name) + " must have dtype " + dtype_name + ", got " +
                                    std::string(py::str(arr.dtype())) + ": convert with .astype(np." +
                                    dtype_name + ")");
    }
    if (!(arr.flags() & py::array::c_style)) {
        throw std::invalid_argument(std::string(name) +
                                    " must be C-contiguous: pass np.ascontiguousarray(...)");
    }
    return arr;
}

// trained may be uint8 or bool (both one byte per token).
py::array require_mask(const py::handle& obj) {
    if (py::isinstance<py::array>(obj)) {
        auto arr = py::reinterpret_borrow<py::array>(obj);
        if (arr.dtype().kind() == 'b') return require_1d(obj, "trained", "bool", 'b', 1);
    }
    return require_1d(obj, "trained", "uint8", 'u', 1);
}

// ------------------------------------------------------------------------------------------------
// pack

py::tuple pack(const py::object& lengths_obj, int64_t capacity, uint64_t seed) {
    py::array lengths_arr = require_1d(lengths_obj, "lengths", "int64", 'i', 8);
    if (capacity <= 0) {
        throw std::invalid_argument("capacity must be positive, got " + std::to_string(capacity) +
                                    ": pass the row size in tokens (e.g. --row-size 4096)");
    }
    if (capacity > kMaxCapacity) {
        throw std::invalid_argument("capacity " + std::to_string(capacity) +
                                    " exceeds the maximum row size " + std::to_string(kMaxCapacity) +
                                    ": use a smaller --row-size");
    }
    const int64_t n = static_cast<int64_t>(lengths_arr.shape(0));
    if (n >= std::numeric_limits<int32_t>::max()) {
        throw std::invalid_argument("too many sequences (" + std::to_string(n) +
                                    "): pack at most 2**31-2 at a time");
    }
    const int64_t* lengths = static_cast<const int64_t*>(lengths_arr.data());
    const size_t N = static_cast<size_t>(n);
    const size_t C = static_cast<size_t>(capacity);

    std::vector<int32_t> order(N);       // visiting order: sequence ids, longest first
    std::vector<int32_t> sorted_len(N);  // sorted_len[k] = lengths[order[k]], kept so the hot loop reads
                                         // sequentially instead of gathering from `lengths` (2x at 2.3M)
    std::vector<int32_t> row_of(N);      // row_of[k] = row of the k-th visited sequence
    int64_t num_rows = 0;
    {
        py::gil_scoped_release release;

        for (int64_t i = 0; i < n; ++i) {
            const int64_t len = lengths[i];
            if (len <= 0) {
                throw std::invalid_argument(
                    "lengths[" + std::to_string(i) + "] = " + std::to_string(len) +
                    ": every sequence needs at least one token; drop empty sequences before packing");
            }
            if (len > capacity) {
                throw std::invalid_argument(
                    "lengths[" + std::to_string(i) + "] = " + std::to_string(len) + " exceeds capacity " +
                    std::to_string(capacity) +
                    ": split the conversation (overflow='split') or raise --max-length / --row-size");
            }
        }

        // 1. Length descending, ties by index ascending.
        if (capacity <= 4 * n + 65536) {
            // Counting sort, stable by construction: O(n + C). slot[C - len] = next position of `len`.
            std::vector<int64_t> slot(C + 1, 0);
            for (size_t i = 0; i < N; ++i) ++slot[C - static_cast<size_t>(lengths[i])];
            int64_t pos = 0;
            for (size_t v = 0; v <= C; ++v) {  // v = C - len: longest first
                const int64_t count = slot[v];
                slot[v] = pos;
                std::fill(sorted_len.begin() + pos, sorted_len.begin() + pos + count,
                          static_cast<int32_t>(C - v));
                pos += count;
            }
            for (size_t i = 0; i < N; ++i) {
                const size_t v = C - static_cast<size_t>(lengths[i]);
                order[static_cast<size_t>(slot[v]++)] = static_cast<int32_t>(i);
            }
        } else {
            // Few sequences, huge capacity: sort packed (C - len, index) keys instead.
            std::vector<uint64_t> keys(N);
            for (size_t i = 0; i < N; ++i) keys[i] = (uint64_t(capacity - lengths[i]) << 32) | uint64_t(i);
            std::sort(keys.begin(), keys.end());
            for (size_t k = 0; k < N; ++k) {
                order[k] = static_cast<int32_t>(keys[k] & 0xFFFFFFFFULL);
                sorted_len[k] = static_cast<int32_t>(capacity - static_cast<int64_t>(keys[k] >> 32));
            }
        }

        // 2. Best fit. head[r] = top of the stack of open rows with remaining capacity r; next_row links
        // the stack. nonempty marks the r whose stack is non-empty.
        std::vector<int32_t> head(C + 1, -1);
        std::vector<int32_t> next_row;
        next_row.reserve(N / 4 + 16);
        LevelBitset nonempty(capacity + 1);
        for (size_t k = 0; k < N; ++k) {
            const int64_t len = sorted_len[k];
            int64_t r = nonempty.find_next(len);
            int32_t row;
            if (r >= 0) {
                row = head[static_cast<size_t>(r)];
                head[static_cast<size_t>(r)] = next_row[static_cast<size_t>(row)];
                if (head[static_cast<size_t>(r)] < 0) nonempty.clear(r);
            } else {
                row = static_cast<int32_t>(next_row.size());
                next_row.push_back(-1);
                r = capacity;
            }
            row_of[k] = row;
            const int64_t left = r - len;
            if (left > 0) {
                next_row[static_cast<size_t>(row)] = head[static_cast<size_t>(left)];
                if (head[static_cast<size_t>(left)] < 0) nonempty.set(left);
                head[static_cast<size_t>(left)] = static_cast<int32_t>(row);
            }
        }
        num_rows = static_cast<int64_t>(next_row.size());
    }

    // 3. Outputs (allocated under the GIL), then filled directly in shuffled order.
    py::array_t<int64_t> row_offsets(num_rows + 1);
    py::array_t<int64_t> row_seqs(n);
    int64_t* out_offsets = row_offsets.mutable_data();
    int64_t* out_seqs = row_seqs.mutable_data();
    {
        py::gil_scoped_release release;
        const size_t R = static_cast<size_t>(num_rows);

        // 4. Seeded Fisher-Yates over the rows: output row r is packed row perm[r]; final[row] inverts it.
        std::vector<int32_t> perm(R);
        for (size_t r = 0; r < R; ++r) perm[r] = static_cast<int32_t>(r);
        SplitMix64 rng(seed);
        for (int64_t i = num_rows - 1; i >= 1; --i) {
            const int64_t j = static_cast<int64_t>(rng.next() % static_cast<uint64_t>(i + 1));
            std::swap(perm[static_cast<size_t>(i)], perm[static_cast<size_t>(j)]);
        }
        std::vector<int32_t> final_pos(R);
        for (size_t r = 0; r < R; ++r) final_pos[static_cast<size_t>(perm[r])] = static_cast<int32_t>(r);

        // Stable counting sort of the visited sequences by final row: rows keep insertion order.
        std::fill(out_offsets, out_offsets + R + 1, 0);
        for (size_t k = 0; k < N; ++k) {
            ++out_offsets[static_cast<size_t>(final_pos[static_cast<size_t>(row_of[k])]) + 1];
        }
        for (size_t r = 0; r < R; ++r) out_offsets[r + 1] += out_offsets[r];
        std::vector<int64_t> fill(out_offsets, out_offsets + R);
        for (size_t k = 0; k < N; ++k) {
            out_seqs[fill[static_cast<size_t>(final_pos[static_cast<size_t>(row_of[k])])]++] = order[k];
        }
    }
    return py::make_tuple(row_offsets, row_seqs);
}

// ------------------------------------------------------------------------------------------------
// assemble: gather the selected sequences into one packed micro-batch (the contract in README.md).

py::dict assemble(const py::object& tokens_obj, const py::object& trained_obj, const py::object& weight_obj,
                  const py::object& seq_offsets_obj, const py::object& seq_ids_obj) {
    py::array tokens_arr = require_1d(tokens_obj, "tokens", "int32", 'i', 4);
    py::array trained_arr = require_mask(trained_obj);
    py::array weight_arr = require_1d(weight_obj, "weight", "float32", 'f', 4);
    py::array offsets_arr = require_1d(seq_offsets_obj, "seq_offsets", "int64", 'i', 8);
    py::array ids_arr = require_1d(seq_ids_obj, "seq_ids", "int64", 'i', 8);

    const int64_t total = static_cast<int64_t>(tokens_arr.shape(0));
    if (trained_arr.shape(0) != total || weight_arr.shape(0) != total) {
        throw std::invalid_argument("tokens, trained and weight must have the same length, got " +
                                    std::to_string(total) + ", " + std::to_string(trained_arr.shape(0)) +
                                    " and " + std::to_string(weight_arr.shape(0)));
    }
    if (offsets_arr.shape(0) < 1) {
        throw std::invalid_argument("seq_offsets must hold n+1 >= 1 entries (it starts with 0)");
    }
    const int64_t num_seqs = static_cast<int64_t>(offsets_arr.shape(0)) - 1;
    const int64_t k = static_cast<int64_t>(ids_arr.shape(0));

    const int32_t* tokens = static_cast<const int32_t*>(tokens_arr.data());
    const uint8_t* trained = static_cast<const uint8_t*>(trained_arr.data());
    const float* weight = static_cast<const float*>(weight_arr.data());
    const int64_t* seq_offsets = static_cast<const int64_t*>(offsets_arr.data());
    const int64_t* seq_ids = static_cast<const int64_t*>(ids_arr.data());

    // Pass 1 (GIL released): validate only the sequences we touch (the store's offset array can hold
    // millions of entries; checking all of them per micro-batch would dominate), count T and N.
    int64_t T = 0, N = 0, max_seqlen = 0;
    {
        py::gil_scoped_release release;
        for (int64_t s = 0; s < k; ++s) {
            const int64_t id = seq_ids[s];
            if (id < 0 || id >= num_seqs) {
                throw std::invalid_argument("seq_ids[" + std::to_string(s) + "] = " + std::to_string(id) +
                                            " is out of range [0, " + std::to_string(num_seqs) +
                                            "): the row refers to a sequence the store does not hold");
            }
            const int64_t begin = seq_offsets[id], end = seq_offsets[id + 1];
            if (begin < 0 || end <= begin || end > total) {
                throw std::invalid_argument(
                    "seq_offsets[" + std::to_string(id) + ":" + std::to_string(id + 2) + "] = [" +
                    std::to_string(begin) + ", " + std::to_string(end) +
                    "] is not an increasing range inside [0, " + std::to_string(total) +
                    "]: the offsets are corrupt (rebuild the cache)");
            }
            T += end - begin;
            max_seqlen = std::max(max_seqlen, end - begin);
            for (int64_t j = begin + 1; j < end; ++j) N += trained[j] != 0;
        }
        if (T >= std::numeric_limits<int32_t>::max()) {
            throw std::invalid_argument("micro-batch of " + std::to_string(T) +
                                        " tokens does not fit int32 cu_seqlens: use smaller rows");
        }
    }

    py::array_t<int64_t> input_ids(T), position_ids(T), labels(T), loss_index(N);
    py::array_t<int32_t> cu_seqlens(k + 1);
    py::array_t<float> loss_weight(N);
    int64_t* o_ids = input_ids.mutable_data();
    int64_t* o_pos = position_ids.mutable_data();
    int64_t* o_labels = labels.mutable_data();
    int64_t* o_index = loss_index.mutable_data();
    int32_t* o_cu = cu_seqlens.mutable_data();
    float* o_weight = loss_weight.mutable_data();

    // Pass 2 (GIL released): fill.
    {
        py::gil_scoped_release release;
        int64_t t = 0, m = 0;
        o_cu[0] = 0;
        for (int64_t s = 0; s < k; ++s) {
            const int64_t begin = seq_offsets[seq_ids[s]], end = seq_offsets[seq_ids[s] + 1];
            for (int64_t j = begin; j < end; ++j, ++t) {
                o_ids[t] = tokens[j];
                o_pos[t] = j - begin;
                // The label of position t is the next token, only if it is trained and in this sequence.
                if (j + 1 < end && trained[j + 1]) {
                    o_labels[t] = tokens[j + 1];
                    o_index[m] = t;
                    o_weight[m] = weight[j + 1];
                    ++m;
                } else {
                    o_labels[t] = -100;
                }
            }
            o_cu[s + 1] = static_cast<int32_t>(t);
        }
    }

    py::dict out;
    out["input_ids"] = input_ids;
    out["position_ids"] = position_ids;
    out["cu_seqlens"] = cu_seqlens;
    out["max_seqlen"] = py::int_(max_seqlen);
    out["labels"] = labels;
    out["loss_index"] = loss_index;
    out["loss_weight"] = loss_weight;
    return out;
}

}  // namespace

PYBIND11_MODULE(_packer, m) {
    m.doc() = "soulchat packing core: best-fit-decreasing row packing and packed micro-batch assembly";
    m.attr("MAX_CAPACITY") = kMaxCapacity;
    m.def("pack", &pack, py::arg("lengths"), py::arg("capacity"), py::arg("seed") = 0,
          "Best-fit-decreasing packing of int64 `lengths` into rows of `capacity` tokens, rows shuffled\n"
          "by `seed` (uint64). Returns (row_offsets int64 [R+1], row_seqs int64 [n]).");
    m.def("assemble", &assemble, py::arg("tokens"), py::arg("trained"), py::arg("weight"),
          py::arg("seq_offsets"), py::arg("seq_ids"),
          "Packed micro-batch of the sequences `seq_ids`: dict of input_ids, position_ids, cu_seqlens,\n"
          "max_seqlen, labels, loss_index, loss_weight.");
}
