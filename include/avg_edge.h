/*
 * avg_edge.h: the C ABI of the avg-edge runtime (libavg_edge.so).
 *
 * Build the library with `make capi` (or `python -m avg_edge.runtime.capi.build`);
 * it embeds CPython and the avg-edge runtime (no torch).  Link with -lavg_edge.
 *
 * Ownership
 *   - Strings you pass in are only read during the call; you keep them.
 *   - *result_json from avg_edge_run is allocated by the library: release it with
 *     avg_edge_free_string().  Never free() it yourself.
 *   - avg_edge_last_error() and avg_edge_version() return library-owned strings: do not
 *     free them.  last_error stays valid until the next avg_edge_* call on the same thread.
 *   - The text piece passed to the token callback is valid only during the callback.
 *
 * Threads
 *   - Every function may be called from any thread.  Calls on one context are
 *     serialised (a second avg_edge_run on the same context waits for the first;
 *     avg_edge_close waits for a run in progress, then closes); separate contexts may
 *     run from separate threads.
 *   - The token callback must not call avg_edge_run or avg_edge_close on the context it
 *     is answering for: such a call returns AVG_EDGE_ERR_BUSY at once (the context stays
 *     open and the answer goes on).  Return non-zero from the callback to stop instead.
 *   - The last error is per thread.
 *
 * Return codes: AVG_EDGE_OK (0) or one of the AVG_EDGE_ERR_* below; the message is in
 * avg_edge_last_error().  Errors in calls never abort the host process.
 *
 * The embedded Python starts on the first call.  If it cannot start at all (the
 * virtualenv the library was built from was removed), cffi prints why on stderr, the
 * int functions return 0 without doing anything and the string functions return NULL:
 * initialise *out_ctx to NULL and check it after avg_edge_open, and check strings for NULL.  A
 * PYTHONHOME pointing at a broken Python makes CPython itself abort; leave PYTHONHOME
 * unset unless you mean it (the library sets it to the Python it was built with and
 * restores the environment once Python runs).
 */
#ifndef AVG_EDGE_H
#define AVG_EDGE_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* BEGIN CDEF (this block is also what the library is built from) */
#define AVG_EDGE_OK 0
#define AVG_EDGE_ERR_ARGUMENT 1   /* usage: a NULL pointer, an empty question, a bad option */
#define AVG_EDGE_ERR_BUILD 2      /* build: folder missing, incomplete, corrupt or of another format */
#define AVG_EDGE_ERR_IMAGE 3      /* image: the image bytes could not be decoded */
#define AVG_EDGE_ERR_RUNTIME 4    /* failed: inference failed in the backend */
#define AVG_EDGE_ERR_CANCELLED 5  /* cancelled: the token callback returned non-zero */
#define AVG_EDGE_ERR_INTERNAL 6   /* internal: a bug, please report the message */
#define AVG_EDGE_ERR_LIMIT 7      /* limit: beyond the build (prompt longer than the context, too many crops) */
#define AVG_EDGE_ERR_BUSY 8       /* busy: a call on this context from its own token callback */

typedef struct avg_edge_ctx avg_edge_ctx;

/* Called with each new piece of the answer (UTF-8, NUL-terminated).  Return 0 to go on,
 * non-zero to stop (avg_edge_run then returns AVG_EDGE_ERR_CANCELLED). */
typedef int (*avg_edge_token_cb)(const char *piece, void *user_data);

/* Open a build folder made by `avg-export build`.  options_json may be NULL or e.g.
 * {"backend": "auto"|"ort"|"trt", "verify": false, "threads": 0}. */
int avg_edge_open(const char *build_dir, const char *options_json, avg_edge_ctx **out_ctx);

/* Answer `question` about the image in (image, image_len) (PNG, JPEG, ... bytes).
 * params_json may be NULL or {"granularity": "auto"|36|72|144|288|576, "max_new_tokens": 256,
 * "max_visual_tokens": null, "temperature": 0.0, "top_k": null, "top_p": null, "seed": null}.
 * max_visual_tokens: a budget for the image; the router's best granularity among those that fit
 * (AVG_EDGE_ERR_LIMIT when none fits).  on_token may be NULL.
 * On success *result_json (if result_json is not NULL) receives
 * {"answer", "token_ids", "granularity", "router_logits", "router_probs", "visual_tokens",
 *  "visual_tokens_full", "finish_reason", "timings"}. */
int avg_edge_run(avg_edge_ctx *ctx, const unsigned char *image, size_t image_len, const char *question,
                 const char *params_json, avg_edge_token_cb on_token, void *user_data, char **result_json);

void avg_edge_free_string(char *s);
const char *avg_edge_last_error(void);
const char *avg_edge_version(void);

/* Release the context; NULL is accepted and ignored.  AVG_EDGE_ERR_BUSY from inside its
 * own token callback (the context stays open), AVG_EDGE_ERR_ARGUMENT if already closed. */
int avg_edge_close(avg_edge_ctx *ctx);
/* END CDEF */

#ifdef __cplusplus
}
#endif
#endif /* AVG_EDGE_H */
