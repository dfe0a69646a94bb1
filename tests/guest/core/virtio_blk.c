/* virtio-blk driver: see include/virtio_blk.h. */
#include "lib.h"
#include "mm.h"
#include "report.h"
#include "virtio_blk.h"

#define BLK_TABLE_ENTRIES 16

static struct blk_dev blk_devs[VIRTIO_MAX_DEVICES];

struct blk_dev *blk_open(u32 nth, u64 wanted, bool indirect, const char **why)
{
    struct virtio_dev *d = virtio_find(VIRTIO_ID_BLOCK, nth);
    if (!d) {
        *why = "no-device";
        return NULL;
    }
    struct blk_dev *b = &blk_devs[d->index];
    if (!b->hdr) {
        u8 *page = dma_alloc(PAGE_SIZE);
        b->data = dma_alloc(BLK_DATA_MAX);
        b->data2 = dma_alloc(BLK_DATA_MAX);
        if (!page || !b->data || !b->data2) {
            *why = "out-of-dma-memory";
            return NULL;
        }
        b->hdr = (volatile struct virtio_blk_req_hdr *)page;
        b->status = page + 64;
        b->id = page + 128;
        b->table = (volatile struct virtq_desc *)(page + 256);
    }
    b->vdev = d;
    b->nth = nth;
    if (indirect)
        wanted |= VIRTIO_F_INDIRECT_DESC;
    if (!virtio_init_simple(d, wanted, 0, why))
        return NULL;
    if (indirect && !(d->acked & VIRTIO_F_INDIRECT_DESC)) {
        *why = "indirect-not-offered";
        return NULL;
    }
    b->indirect = indirect;
    b->capacity = virtio_config_read64(d, VIRTIO_BLK_CFG_CAPACITY);
    b->seg_max = (d->offered & VIRTIO_BLK_F_SEG_MAX)
        ? virtio_config_read32(d, VIRTIO_BLK_CFG_SEG_MAX) : 0;
    return b;
}

bool blk_request(struct blk_dev *b, u32 type, u64 sector, void *data, u32 len,
                 struct blk_result *r)
{
    struct virtq *vq = &b->vdev->vq[0];
    b->hdr->type = type;
    b->hdr->reserved = 0;
    b->hdr->sector = sector;
    *b->status = BLK_STATUS_UNTOUCHED;

    struct virtq_buf bufs[3];
    u32 n = 0;
    bufs[n++] = (struct virtq_buf){ virt_to_phys((const void *)b->hdr), sizeof(struct virtio_blk_req_hdr), false };
    if (len)
        bufs[n++] = (struct virtq_buf){ virt_to_phys(data), len, type != VIRTIO_BLK_T_OUT };
    bufs[n++] = (struct virtq_buf){ virt_to_phys((const void *)b->status), 1, true };

    memset(r, 0, sizeof(*r));
    r->status = BLK_STATUS_UNTOUCHED;
    int head = virtq_submit(vq, bufs, n, b->indirect ? b->table : NULL);
    if (head < 0) {
        fail("virtio", "no-descriptors dev=%u queue=0", b->vdev->index);
        r->wait = VIRTQ_WAIT_TIMEOUT;
        return false;
    }
    virtq_kick(vq);
    r->wait = virtq_wait(vq, BLK_TIMEOUT_MS);
    if (r->wait == VIRTQ_WAIT_TIMEOUT) {
        fail("virtio", "timeout dev=%u queue=0 type=%u sector=%llu", b->vdev->index, type, sector);
        return false;
    }
    if (r->wait == VIRTQ_WAIT_POLLED)
        fail("virtio", "no-interrupt dev=%u queue=0 type=%u sector=%llu", b->vdev->index, type, sector);
    r->completed = virtq_pop_used(vq, &r->id, &r->used_len, true);
    r->status = *b->status;
    if (r->completed && r->id != (u32)head)
        fail("virtio", "wrong-id dev=%u queue=0 id=%u head=%d", b->vdev->index, r->id, head);
    return r->completed;
}

const char *blk_status_name(u8 status, char *buf, size_t size)
{
    switch (status) {
    case VIRTIO_BLK_S_OK: return "ok";
    case VIRTIO_BLK_S_IOERR: return "ioerr";
    case VIRTIO_BLK_S_UNSUPP: return "unsupp";
    case BLK_STATUS_UNTOUCHED: return "untouched";
    default:
        ksnprintf(buf, size, "0x%02x", status);
        return buf;
    }
}

void blk_pattern_fill(u8 *buf, u64 sector, u32 sectors)
{
    for (u32 s = 0; s < sectors; s++) {
        u32 h = (u32)(sector + s) * 2654435761u;
        u8 *p = buf + (u64)s * BLK_SECTOR_SIZE;
        for (u32 off = 0; off < BLK_SECTOR_SIZE; off++, h += 40503u)
            p[off] = (u8)(h ^ (h >> 16));
    }
}
