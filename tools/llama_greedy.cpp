// llama-greedy: llama.cpp fed token ids, decoding greedily, measured (issue #20, item 1).
//
//     llama-greedy MODEL.gguf IDS TOKENS [THREADS] [--no-mmap] [--no-repack]
//
// IDS: the prompt's token ids, comma-separated. Loads MODEL (memory-mapped, llama.cpp's default
// for a user, unless --no-mmap: read into memory), runs the prompt as one batch, then decodes
// TOKENS tokens greedily (the argmax of the logits, the lowest id on ties, as numpy's argmax;
// end-of-generation tokens do not stop it): the first from the prompt's logits, then one
// llama_process call per token. Prints one JSON line on stdout:
//   tokens              the TOKENS ids generated
//   load_seconds        llama_model_load_from_file + llama_init_from_model
//   prefill_seconds     the prompt's batch and the first token's argmax
//   decode_seconds      one entry per later token (TOKENS - 1): its llama_process and argmax
//   rss_before_load_bytes  this process's RSS before the model was loaded (the runtime's)
//   peak_rss_bytes      the peak RSS at the end (VmHWM: this program's own, from its exec)
//   read_bytes_load / _prefill / _decode  bytes read from storage (/proc/self/io read_bytes:
//                       read(2) and page faults of a mapping alike) in each phase
// llama.cpp's own log goes to stderr, warnings and errors only; a failure exits 1 with its
// reason as stderr's last line.
//
// Built by tools/llama_cpp.py (greedy_binary()) against the cached llama.cpp static libraries.

#include "llama.h"

#include <sys/resource.h>
#include <unistd.h>

#include <chrono>
#include <clocale>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

namespace {

double now_seconds() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// /proc/self/io's read_bytes: bytes this process caused to be fetched from storage.
long long storage_read_bytes() {
    std::ifstream io("/proc/self/io");
    std::string key;
    long long value = 0;
    while (io >> key >> value) {
        if (key == "read_bytes:") {
            return value;
        }
    }
    return -1;  // no /proc/self/io (not Linux, or no task I/O accounting)
}

// A /proc/self/status field in bytes ("VmRSS:", "VmHWM:"), or -1.
long long status_bytes(const std::string & field) {
    std::ifstream status("/proc/self/status");
    std::string line;
    while (std::getline(status, line)) {
        if (line.compare(0, field.size(), field) == 0) {
            return std::atoll(line.c_str() + field.size()) * 1024;  // kB
        }
    }
    return -1;
}

long long current_rss_bytes() {
    return status_bytes("VmRSS:");
}

// The peak RSS of this program: VmHWM starts afresh at exec, whereas getrusage's ru_maxrss
// carries over the peak of the process that forked it (a benchmark's Python, ~1 GB).
long long peak_rss_bytes() {
    const long long hwm = status_bytes("VmHWM:");
    if (hwm >= 0) {
        return hwm;
    }
    struct rusage usage {};
    getrusage(RUSAGE_SELF, &usage);
    return static_cast<long long>(usage.ru_maxrss) * 1024;  // Linux: kilobytes
}

[[noreturn]] void fail(const std::string & why) {
    fprintf(stderr, "llama-greedy: %s\n", why.c_str());
    exit(1);
}

void quiet_log(ggml_log_level level, const char * text, void *) {
    if (level == GGML_LOG_LEVEL_WARN || level == GGML_LOG_LEVEL_ERROR) {
        fputs(text, stderr);
    }
}

std::vector<llama_token> parse_ids(const std::string & text) {
    std::vector<llama_token> ids;
    std::stringstream in(text);
    std::string item;
    while (std::getline(in, item, ',')) {
        char * end = nullptr;
        long id = strtol(item.c_str(), &end, 10);
        if (item.empty() || *end != '\0' || id < 0) {
            fail("bad token id '" + item + "' in the prompt (want comma-separated integers)");
        }
        ids.push_back(static_cast<llama_token>(id));
    }
    if (ids.empty()) {
        fail("empty prompt");
    }
    return ids;
}

// Fill `batch` with `tokens` at positions pos0.., logits asked for the last one only.
void set_batch(llama_batch_ext * batch, const llama_token * tokens, int n, llama_pos pos0) {
    llama_batch_ext_clear(batch);
    for (int i = 0; i < n; ++i) {
        const int32_t idx = llama_batch_ext_add_token(batch, 0, tokens[i]);
        const llama_pos pos = pos0 + i;
        llama_batch_ext_set_pos(batch, idx, &pos);
    }
    llama_batch_ext_set_output_logits(batch, n - 1, true);
}

llama_token argmax_last(llama_context * ctx, int n_vocab) {
    const float * logits = llama_get_logits_ith(ctx, -1);
    if (logits == nullptr) {
        fail("no logits after a decode");
    }
    int best = 0;
    for (int i = 1; i < n_vocab; ++i) {
        if (logits[i] > logits[best]) {
            best = i;
        }
    }
    return best;
}

std::string json_list(const std::vector<double> & values) {
    std::string out = "[";
    char buf[64];
    for (size_t i = 0; i < values.size(); ++i) {
        snprintf(buf, sizeof(buf), "%s%.9g", i ? ", " : "", values[i]);
        out += buf;
    }
    return out + "]";
}

}  // namespace

int main(int argc, char ** argv) {
    std::setlocale(LC_NUMERIC, "C");
    std::vector<std::string> positional;
    bool mmap = true, repack = true;
    for (int i = 1; i < argc; ++i) {
        if (strcmp(argv[i], "--no-mmap") == 0) {
            mmap = false;
        } else if (strcmp(argv[i], "--no-repack") == 0) {
            repack = false;
        } else {
            positional.emplace_back(argv[i]);
        }
    }
    if (positional.size() < 3 || positional.size() > 4) {
        fail("usage: llama-greedy MODEL.gguf IDS TOKENS [THREADS] [--no-mmap] [--no-repack]");
    }
    const std::string model_path = positional[0];
    const std::vector<llama_token> prompt = parse_ids(positional[1]);
    const int n_generate = atoi(positional[2].c_str());
    const int threads = positional.size() > 3 ? atoi(positional[3].c_str()) : 1;
    if (n_generate < 1 || threads < 1) {
        fail("TOKENS and THREADS must be positive");
    }

    llama_log_set(quiet_log, nullptr);
    llama_backend_init();
    const long long rss_before = current_rss_bytes();
    const long long read0 = storage_read_bytes();

    const double t_load = now_seconds();
    llama_model_params mparams = llama_model_default_params();
    mparams.n_gpu_layers = 0;
    mparams.load_mode = mmap ? LLAMA_LOAD_MODE_MMAP : LLAMA_LOAD_MODE_NONE;
    mparams.use_extra_bufts = repack;
    llama_model * model = llama_model_load_from_file(model_path.c_str(), mparams);
    if (model == nullptr) {
        fail("unable to load " + model_path);
    }
    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    for (llama_token id : prompt) {
        if (id >= n_vocab) {
            fail("prompt token " + std::to_string(id) + " is outside the vocabulary (" +
                 std::to_string(n_vocab) + ")");
        }
    }
    llama_context_params cparams = llama_context_default_params();
    cparams.n_ctx = static_cast<uint32_t>(prompt.size() + n_generate);
    cparams.n_batch = static_cast<uint32_t>(prompt.size());
    cparams.n_threads = threads;
    cparams.n_threads_batch = threads;
    llama_context * ctx = llama_init_from_model(model, cparams);
    if (ctx == nullptr) {
        fail("unable to create the llama_context");
    }
    llama_batch_ext * batch = llama_batch_ext_init(ctx);
    const double load_seconds = now_seconds() - t_load;
    const long long read1 = storage_read_bytes();

    std::vector<llama_token> out;
    const double t_prefill = now_seconds();
    set_batch(batch, prompt.data(), static_cast<int>(prompt.size()), 0);
    if (llama_process(ctx, LLAMA_PROCESS_TYPE_DECODE, batch) != 0) {
        fail("the prompt's decode failed");
    }
    out.push_back(argmax_last(ctx, n_vocab));
    const double prefill_seconds = now_seconds() - t_prefill;
    const long long read2 = storage_read_bytes();

    std::vector<double> decode_seconds;
    llama_pos pos = static_cast<llama_pos>(prompt.size());
    while (static_cast<int>(out.size()) < n_generate) {
        const double t = now_seconds();
        set_batch(batch, &out.back(), 1, pos++);
        if (llama_process(ctx, LLAMA_PROCESS_TYPE_DECODE, batch) != 0) {
            fail("decode failed at token " + std::to_string(out.size()));
        }
        out.push_back(argmax_last(ctx, n_vocab));
        decode_seconds.push_back(now_seconds() - t);
    }
    const long long read3 = storage_read_bytes();
    const long long peak = peak_rss_bytes();

    std::string tokens = "[";
    for (size_t i = 0; i < out.size(); ++i) {
        tokens += (i ? ", " : "") + std::to_string(out[i]);
    }
    tokens += "]";
    auto delta = [](long long a, long long b) { return a < 0 || b < 0 ? -1 : b - a; };
    printf("{\"tokens\": %s, \"load_seconds\": %.9g, \"prefill_seconds\": %.9g, "
           "\"decode_seconds\": %s, \"rss_before_load_bytes\": %lld, \"peak_rss_bytes\": %lld, "
           "\"read_bytes_load\": %lld, \"read_bytes_prefill\": %lld, \"read_bytes_decode\": %lld, "
           "\"mmap\": %s, \"repack\": %s, \"threads\": %d}\n",
           tokens.c_str(), load_seconds, prefill_seconds, json_list(decode_seconds).c_str(),
           rss_before, peak, delta(read0, read1), delta(read1, read2), delta(read2, read3),
           mmap ? "true" : "false", repack ? "true" : "false", threads);
    fflush(stdout);

    llama_batch_ext_free(batch);
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
