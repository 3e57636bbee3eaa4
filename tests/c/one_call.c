/* One avg_edge_open and (if it worked) one avg_edge_run, printing each return code:
 *   one_call BUILD_DIR IMAGE QUESTION PARAMS_JSON [cancel]
 * prints "open <code> <message>" and "run <code> <message>".  With "cancel" the token
 * callback stops the answer at its first piece. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "avg_edge.h"

static int stop(const char *piece, void *user_data) {
    (void)piece;
    (void)user_data;
    return 1;
}

int main(int argc, char **argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: %s BUILD_DIR IMAGE QUESTION PARAMS_JSON [cancel]\n", argv[0]);
        return 2;
    }
    static unsigned char image[1 << 22];
    FILE *f = fopen(argv[2], "rb");
    size_t n = f ? fread(image, 1, sizeof image, f) : 0;
    if (f) fclose(f);
    avg_edge_ctx *ctx = NULL;
    int rc = avg_edge_open(argv[1], "{\"backend\": \"ort\"}", &ctx);
    printf("open %d %s\n", rc, avg_edge_last_error());
    if (rc != AVG_EDGE_OK) return 0;
    char *result = NULL;
    int cancel = argc > 5 && strcmp(argv[5], "cancel") == 0;
    rc = avg_edge_run(ctx, image, n, argv[3], argv[4], cancel ? stop : NULL, NULL, &result);
    printf("run %d %s\n", rc, avg_edge_last_error());
    avg_edge_free_string(result);
    avg_edge_close(ctx);
    return 0;
}
