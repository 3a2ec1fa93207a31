// Lets Swift import the system's libjpeg through the CJPEG module (see module.modulemap), plus one decoding
// function, pea_jpeg_decode, written here in C because libjpeg reports fatal errors by calling error_exit,
// which must not return: the function recovers with setjmp/longjmp, and both stay inside this C frame, so no
// longjmp ever crosses a Swift frame.
#ifndef PEA_CJPEG_SHIM_H
#define PEA_CJPEG_SHIM_H

#include <stddef.h>
#include <stdio.h>   // jpeglib.h uses FILE and size_t without including their headers
#include <stdlib.h>
#include <string.h>
#include <setjmp.h>
#include <jpeglib.h>
#include <jerror.h>

/// What pea_jpeg_decode returns: on success `pixels` (malloc'd; release with pea_jpeg_free) holds
/// `height` rows of `width * components` bytes as libjpeg outputs them with its default settings (accurate
/// integer IDCT, fancy upsampling) — components 1 (greyscale), 3 (RGB, converted from YCbCr when the file
/// is YCbCr) or 4 (CMYK/YCCK files, as CMYK bytes exactly as stored); on failure `pixels` is NULL and
/// `message` says why (libjpeg's own message).
typedef struct {
    unsigned char *pixels;
    int width;
    int height;
    int components;
    char message[JMSG_LENGTH_MAX + 96];
} pea_jpeg_image;

struct pea_jpeg_error_manager {
    struct jpeg_error_mgr base;
    jmp_buf jump;
    char *message;  // pea_jpeg_image.message
};

// Fatal errors: format libjpeg's message, then return to the setjmp in pea_jpeg_decode (C frames only).
static inline void pea_jpeg_error_exit(j_common_ptr info) {
    struct pea_jpeg_error_manager *manager = (struct pea_jpeg_error_manager *)info->err;
    (*info->err->format_message)(info, manager->message);
    longjmp(manager->jump, 1);
}

// Warnings are counted and not printed, except "Premature end of JPEG file": libjpeg would go on and fill
// the rest of the image with grey, where Pillow refuses a truncated file; it is treated as fatal too.
static inline void pea_jpeg_emit_message(j_common_ptr info, int level) {
    if (level < 0) {
        if (info->err->msg_code == JWRN_JPEG_EOF) {
            pea_jpeg_error_exit(info);
        }
        info->err->num_warnings++;
    }
}

static inline void pea_jpeg_output_message(j_common_ptr info) { (void)info; }

/// Decodes the JPEG file in `data[0..<size]`. Images with more than `max_pixels` pixels (when > 0) are
/// refused before any pixel memory is allocated. Returns 0 on success, -1 on failure (see pea_jpeg_image).
static inline int pea_jpeg_decode(const unsigned char *data, unsigned long size, long long max_pixels,
                                  pea_jpeg_image *out) {
    struct jpeg_decompress_struct info;
    struct pea_jpeg_error_manager manager;
    // Written between setjmp and a possible longjmp, so volatile (C11 7.13.2.1).
    unsigned char *volatile pixels = NULL;

    memset(out, 0, sizeof *out);
    memset(&info, 0, sizeof info);
    info.err = jpeg_std_error(&manager.base);
    manager.base.error_exit = pea_jpeg_error_exit;
    manager.base.emit_message = pea_jpeg_emit_message;
    manager.base.output_message = pea_jpeg_output_message;
    manager.message = out->message;
    if (setjmp(manager.jump)) {
        jpeg_destroy_decompress(&info);
        free(pixels);
        return -1;
    }
    jpeg_create_decompress(&info);
    jpeg_mem_src(&info, data, size);
    jpeg_read_header(&info, TRUE);
    switch (info.num_components) {
        case 1: info.out_color_space = JCS_GRAYSCALE; break;
        case 3: info.out_color_space = JCS_RGB; break;
        case 4: info.out_color_space = JCS_CMYK; break;
        default:
            snprintf(out->message, sizeof out->message, "unsupported: %d colour components", info.num_components);
            jpeg_destroy_decompress(&info);
            return -1;
    }
    if (max_pixels > 0 && (long long)info.image_width * (long long)info.image_height > max_pixels) {
        snprintf(out->message, sizeof out->message, "%u×%u pixels is more than the %lld allowed",
                 info.image_width, info.image_height, max_pixels);
        jpeg_destroy_decompress(&info);
        return -1;
    }
    jpeg_start_decompress(&info);
    size_t stride = (size_t)info.output_width * (size_t)info.output_components;
    pixels = (unsigned char *)malloc(stride * info.output_height + 1);
    if (!pixels) {
        snprintf(out->message, sizeof out->message, "out of memory for %u×%u pixels", info.output_width, info.output_height);
        jpeg_destroy_decompress(&info);
        return -1;
    }
    while (info.output_scanline < info.output_height) {
        JSAMPROW row = pixels + (size_t)info.output_scanline * stride;
        jpeg_read_scanlines(&info, &row, 1);
    }
    jpeg_finish_decompress(&info);
    out->pixels = pixels;
    out->width = (int)info.output_width;
    out->height = (int)info.output_height;
    out->components = info.output_components;
    jpeg_destroy_decompress(&info);
    return 0;
}

static inline void pea_jpeg_free(pea_jpeg_image *image) {
    free(image->pixels);
    image->pixels = NULL;
}

#endif
