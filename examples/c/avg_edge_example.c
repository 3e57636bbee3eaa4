/*
 * avg_edge_example: answer a question about an image through libavg_edge.so.
 *
 *   cc -I include examples/c/avg_edge_example.c -L build/capi -lavg_edge \
 *      -Wl,-rpath,$PWD/build/capi -o build/avg_edge_example
 *   build/avg_edge_example BUILD_DIR IMAGE "QUESTION" [GRANULARITY]
 *
 * The answer streams to stdout; the result JSON goes to stderr.  Exit code: 0, or the
 * AVG_EDGE_ERR_* code of the failing call.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "avg_edge.h"

static int print_piece(const char *piece, void *user_data) {
    (void)user_data;
    fputs(piece, stdout);
    fflush(stdout);
    return 0; /* keep going */
}

static unsigned char *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *buf = malloc(n > 0 ? (size_t)n : 1);
    if (buf && n > 0 && fread(buf, 1, (size_t)n, f) != (size_t)n) {
        free(buf);
        buf = NULL;
    }
    fclose(f);
    *len = n > 0 ? (size_t)n : 0;
    return buf;
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s BUILD_DIR IMAGE QUESTION [GRANULARITY]\n", argv[0]);
        return 2;
    }
    size_t len = 0;
    unsigned char *image = read_file(argv[2], &len);
    if (!image) {
        fprintf(stderr, "error: cannot read %s\n", argv[2]);
        return 2;
    }
    avg_edge_ctx *ctx = NULL;
    int rc = avg_edge_open(argv[1], NULL, &ctx);
    if (rc != AVG_EDGE_OK) {
        fprintf(stderr, "error %d: %s\n", rc, avg_edge_last_error());
        free(image);
        return rc;
    }
    char params[128];
    snprintf(params, sizeof params, "{\"granularity\": \"%s\", \"max_new_tokens\": 32}", argc > 4 ? argv[4] : "auto");
    if (argc > 4 && strcmp(argv[4], "auto") != 0)
        snprintf(params, sizeof params, "{\"granularity\": %s, \"max_new_tokens\": 32}", argv[4]);
    char *result = NULL;
    rc = avg_edge_run(ctx, image, len, argv[3], params, print_piece, NULL, &result);
    fputc('\n', stdout);
    if (rc == AVG_EDGE_OK) {
        fprintf(stderr, "%s\n", result);
        avg_edge_free_string(result);
    } else {
        fprintf(stderr, "error %d: %s\n", rc, avg_edge_last_error());
    }
    avg_edge_close(ctx);
    free(image);
    return rc;
}
