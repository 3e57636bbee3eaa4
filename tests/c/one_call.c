/* One avg_edge_open and (if it worked) one avg_edge_run, printing each return code:
 *   one_call BUILD_DIR IMAGE QUESTION PARAMS_JSON [cancel|rerun|close]
 * prints "open <code> <message>", "run <code> <message>" and "close <code> <message>".
 * With "cancel" the token callback stops the answer at its first piece; with "rerun" or
 * "close" it calls avg_edge_run or avg_edge_close on the running context at its first
 * piece (printing "inner <code> <message>") and lets the answer go on. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "avg_edge.h"

struct call {
    avg_edge_ctx *ctx;
    const char *mode;
    int pieces;
};

static unsigned char image[1 << 22];
static size_t image_len;

static int on_piece(const char *piece, void *user_data) {
    (void)piece;
    struct call *c = user_data;
    if (c->pieces++ > 0) return 0;
    if (strcmp(c->mode, "cancel") == 0) return 1;
    int rc = strcmp(c->mode, "rerun") == 0
                 ? avg_edge_run(c->ctx, image, image_len, "Again?", NULL, NULL, NULL, NULL)
                 : avg_edge_close(c->ctx);
    printf("inner %d %s\n", rc, avg_edge_last_error());
    fflush(stdout);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: %s BUILD_DIR IMAGE QUESTION PARAMS_JSON [cancel|rerun|close]\n", argv[0]);
        return 2;
    }
    FILE *f = fopen(argv[2], "rb");
    image_len = f ? fread(image, 1, sizeof image, f) : 0;
    if (f) fclose(f);
    struct call c = {NULL, argc > 5 ? argv[5] : "", 0};
    int rc = avg_edge_open(argv[1], "{\"backend\": \"ort\"}", &c.ctx);
    printf("open %d %s\n", rc, avg_edge_last_error());
    if (rc != AVG_EDGE_OK) return 0;
    char *result = NULL;
    rc = avg_edge_run(c.ctx, image, image_len, argv[3], argv[4], argc > 5 ? on_piece : NULL, &c, &result);
    printf("run %d %s\n", rc, avg_edge_last_error());
    avg_edge_free_string(result);
    rc = avg_edge_close(c.ctx);
    printf("close %d %s\n", rc, avg_edge_last_error());
    return 0;
}
