/* Bad calls into libavg_edge.so: each must return an error code and a message, never abort.
 * Prints one line per case: "<name> <code> <message>". */
#include <stdio.h>
#include <string.h>

#include "avg_edge.h"

static int stop_now(const char *piece, void *user_data) {
    (void)piece;
    (*(int *)user_data)++;
    return 1;
}

/* Call first, then read the message (it is valid until the next call on this thread). */
#define REPORT(name, call)                                        \
    do {                                                          \
        int rc_ = (call);                                         \
        printf("%s %d %s\n", name, rc_, avg_edge_last_error());   \
    } while (0)

int main(int argc, char **argv) {
    const char *build = argc > 1 ? argv[1] : "";
    avg_edge_ctx *ctx = NULL;
    REPORT("open_null_dir", avg_edge_open(NULL, NULL, &ctx));
    REPORT("open_null_out", avg_edge_open(build, NULL, NULL));
    REPORT("open_missing", avg_edge_open("/nonexistent/avg-build", NULL, &ctx));
    REPORT("open_bad_json", avg_edge_open(build, "{not json", &ctx));
    REPORT("open_ok", avg_edge_open(build, "{\"backend\": \"ort\"}", &ctx));
    const unsigned char junk[] = "definitely not an image";
    char *result = (char *)1;
    REPORT("run_null_ctx", avg_edge_run(NULL, junk, sizeof junk, "q?", NULL, NULL, NULL, &result));
    printf("result_null_on_null_ctx %d\n", result == NULL);
    REPORT("run_null_image", avg_edge_run(ctx, NULL, 0, "q?", NULL, NULL, NULL, &result));
    printf("result_null_after_error %d\n", result == NULL);
    REPORT("run_corrupt_image", avg_edge_run(ctx, junk, sizeof junk, "q?", NULL, NULL, NULL, &result));
    REPORT("run_empty_image", avg_edge_run(ctx, junk, 0, "q?", NULL, NULL, NULL, &result));
    REPORT("run_null_question", avg_edge_run(ctx, junk, sizeof junk, NULL, NULL, NULL, NULL, &result));
    REPORT("run_bad_utf8_question", avg_edge_run(ctx, junk, sizeof junk, "caf\xe9?", NULL, NULL, NULL, &result));
    REPORT("run_bad_params", avg_edge_run(ctx, junk, sizeof junk, "q?", "{\"granularity\": 100}", NULL, NULL, &result));
    REPORT("run_unknown_param", avg_edge_run(ctx, junk, sizeof junk, "q?", "{\"colour\": 1}", NULL, NULL, &result));
    if (argc > 2) { /* a real image: cancel from the callback */
        FILE *f = fopen(argv[2], "rb");
        static unsigned char img[1 << 22];
        size_t n = f ? fread(img, 1, sizeof img, f) : 0;
        if (f) fclose(f);
        int calls = 0;
        REPORT("run_cancelled", avg_edge_run(ctx, img, n, "What?", "{\"max_new_tokens\": 8}", stop_now, &calls, &result));
        printf("callback_calls %d\n", calls);
    }
    REPORT("close_ok", avg_edge_close(ctx));
    REPORT("close_again", avg_edge_close(ctx));
    REPORT("close_null", avg_edge_close(NULL));
    printf("version %s\n", avg_edge_version());
    return 0;
}
